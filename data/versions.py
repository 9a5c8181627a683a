"""Versioned datasets: the manifest, the version id, and the folder layout.

A version lives in ``<datasets>/<workload>/<version>/``::

    manifest.json                       what is inside, and where it came from
    rows/split=train/*.parquet          valid rows (Hive-style partitions)
    rows/split=val/*.parquet
    rows/split=test/*.parquet
    rows/split=quarantine/*.parquet     rows that broke the contract, with the rule
    quarantine_files/<sha256>.<ext>     unreadable raw files, whole (on_unreadable_file)
    preprocessor.json                   features fitted on the train split (some workloads)

A version id is a hash of the inputs (file hashes), the contract and the pipeline
config, so the same inputs give the same id and an ingest of them is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, model_validator

from app.errors import DatasetVersionNotFound
from data.features import ColumnStats

if TYPE_CHECKING:
    import pandera.pandas as pa

SPLITS: tuple[str, ...] = ("train", "val", "test")
QUARANTINE = "quarantine"
QUARANTINED_FILES = "quarantine_files"  # unreadable raw files, kept whole (by sha256)
MANIFEST = "manifest.json"
PREPROCESSOR = "preprocessor.json"


class SourceFile(BaseModel):
    """One raw file: ``rows`` records in it, each valid or quarantined exactly once."""

    path: str
    size: int
    sha256: str
    rows: int
    rows_valid: int = 0
    rows_quarantined: int = 0
    # ingest.on_unreadable_file=quarantine: why the whole file went to the quarantine
    # (then ``rows`` is 0: none of its records were read), and where the version keeps
    # it (relative to the version folder; None: not copied, the workload holds PII).
    unreadable: str | None = None
    kept: str | None = None


class Column(BaseModel):
    name: str
    type: str


def quarantine_share_of(rows_quarantined: int, rows_in: int) -> float:
    """The share of a run's records that went to the quarantine (0 for no records)."""
    return rows_quarantined / rows_in if rows_in else 0.0


def run_id_of(version: str, when: datetime) -> str:
    """An ingest run's id: the version it produced (or would have) and its UTC time, as
    ``_rejected/`` names a rejected run's folder."""
    return f"{version}-{when.astimezone(UTC):%Y%m%dT%H%M%S}"


class DatasetManifest(BaseModel):
    """Everything known about one dataset version; written as ``manifest.json``.

    ``rows_in``, ``rows_valid``, ``rows_quarantined``, ``quarantine_share`` and
    ``run_id`` are the figures of the ingest run that made it, the same that run pushes
    to the pushgateway (data/metrics.py); ``created_at`` is the version's freshness.
    """

    model_config = ConfigDict(extra="forbid")

    version: str
    workload: str
    created_at: datetime
    parent: str | None
    sources: list[SourceFile]
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    # Derived (the share from the counts, the run id from version and created_at), so
    # older manifests have them too and they never disagree with what they come from.
    quarantine_share: float = 0.0
    run_id: str = ""
    splits: dict[str, int]
    quarantine_reasons: dict[str, int]
    columns: list[Column]
    stats: dict[str, ColumnStats] = {}  # of the train split: the drift monitor's reference
    pii_key: str | None = None  # fingerprint of the key behind the pseudonyms, not the key
    content_hash: str
    config: dict[str, Any]
    libraries: dict[str, str]

    @model_validator(mode="after")
    def _derived_figures(self) -> DatasetManifest:
        self.quarantine_share = quarantine_share_of(self.rows_quarantined, self.rows_in)
        self.run_id = self.run_id or run_id_of(self.version, self.created_at)
        return self


def contract_fingerprint(schema: pa.DataFrameSchema) -> dict[str, Any]:
    """A stable description of a contract (pandera cannot serialise custom checks)."""

    def checks(col: Any) -> list[str]:
        return [f"{c.name}{sorted((c.statistics or {}).items())}" for c in col.checks]

    return {
        "strict": schema.strict,
        "columns": {
            name: {
                "dtype": str(col.dtype),
                "nullable": col.nullable,
                "unique": col.unique,
                "checks": checks(col),
            }
            for name, col in schema.columns.items()
        },
    }


def version_id(inputs: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of ``inputs``."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class DatasetStore:
    """The versions of every workload under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def version_dir(self, workload: str, version: str) -> Path:
        return self.root / workload / version

    def split_dir(self, workload: str, version: str, split: str) -> Path:
        return self.version_dir(workload, version) / "rows" / f"split={split}"

    def staging_dir(self, workload: str) -> Path:
        path = self.root / workload / "_staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def manifests(self, workload: str) -> list[DatasetManifest]:
        """All published versions of ``workload``, newest first."""
        found = [
            DatasetManifest.model_validate_json(p.read_text())
            for p in (self.root / workload).glob(f"*/{MANIFEST}")
        ]
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    def get(self, workload: str, ref: str = "latest") -> DatasetManifest:
        """The manifest of ``ref``: ``latest``, a version id, or a unique prefix of one."""
        versions = self.manifests(workload)
        if ref == "latest" and versions:
            return versions[0]
        matches = [m for m in versions if m.version.startswith(ref)] if ref != "latest" else []
        if len(matches) == 1:
            return matches[0]
        hint = (
            f"run `scaledl data ingest --workload {workload}` first"
            if not versions
            else "pick one of: " + ", ".join(m.version for m in versions[:5])
        )
        what = "no dataset version" if ref == "latest" else f"dataset version {ref!r} not found"
        if len(matches) > 1:
            what = f"dataset version prefix {ref!r} is ambiguous"
        raise DatasetVersionNotFound(f"{what} for workload {workload!r}: {hint}")

    def publish(self, staging: Path, manifest: DatasetManifest) -> Path:
        """Move a finished staging folder into place; first writer wins."""
        final = self.version_dir(manifest.workload, manifest.version)
        try:
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            staging.replace(final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise  # not a lost race: an I/O problem to see; staging keeps the data
            # The same inputs were published meanwhile: identical content, keep theirs.
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def reject(self, staging: Path, manifest: DatasetManifest) -> Path:
        """Keep a failed run's output (the quarantine especially) for inspection, with
        its manifest, in ``_rejected/<run id>/`` (never read as a version)."""
        target = self.root / manifest.workload / "_rejected" / manifest.run_id
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        staging.replace(target)
        return target
