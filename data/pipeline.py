"""The ingest pipeline: raw Parquet -> contract check -> split -> versioned dataset.

One streaming pass of Ray Data: every row is read once, checked once, and written once
into the partition of its split, or into the quarantine partition with the rule it broke.
Counts come from the written files' metadata and must reconcile with the input.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.errors import DataContractError
from app.settings import IngestConfig, Settings
from app.workloads import Workload, get_workload
from data.sources import builtin_raw_file, file_sha256
from data.split import assign_split
from data.validate import row_errors
from data.versions import (
    QUARANTINE,
    SPLITS,
    Column,
    DatasetManifest,
    DatasetStore,
    SourceFile,
    contract_fingerprint,
    version_id,
)

PIPELINE_VERSION = "1"
SPLIT_COLUMN = "split"
REASON_COLUMN = "_quarantine_reason"
SOURCE_COLUMN = "_source"


@dataclass(frozen=True)
class IngestResult:
    manifest: DatasetManifest
    path: Path
    reused: bool
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.manifest.rows_in / self.seconds if self.seconds > 0 else float("nan")


@functools.cache
def _contract(workload_name: str):  # noqa: ANN202 - pandera schema, built once per worker
    return get_workload(workload_name).contract()


def mark_rows(
    batch: pd.DataFrame, *, workload_name: str, fractions: tuple[float, float, float], seed: int
) -> pd.DataFrame:
    """Give every row a split: train/val/test, or quarantine with the rule it broke."""
    workload = get_workload(workload_name)
    sources = batch.pop("path").map(lambda p: Path(p).name)
    reasons = row_errors(batch, _contract(workload_name), where=", ".join(sources.unique()))
    out = batch.reset_index(drop=True)
    out[SOURCE_COLUMN] = sources.to_numpy()
    out[REASON_COLUMN] = reasons.to_numpy()
    split = assign_split(out[workload.id_column], fractions, seed)
    out[SPLIT_COLUMN] = np.where(reasons.isna().to_numpy(), split, QUARANTINE)
    return out


def ingest(
    settings: Settings, workload: Workload, source_files: list[Path] | None = None
) -> IngestResult:
    """Turn raw files (default: the workload's built-in set) into a dataset version."""
    import ray.data

    started = time.perf_counter()
    cfg = settings.ingest
    files = source_files or [builtin_raw_file(workload, settings.storage_root.resolve() / "raw")]
    sources = [_describe_source(f) for f in files]
    version = version_id(
        {
            "pipeline": PIPELINE_VERSION,
            "workload": workload.name,
            "sources": sorted(s.sha256 for s in sources),
            "contract": contract_fingerprint(workload.contract()),
            "config": cfg.model_dump(),
            "seed": settings.seed,
        }
    )
    store = DatasetStore(settings.datasets_dir)
    if store.version_dir(workload.name, version).exists():
        manifest = store.get(workload.name, version)
        return IngestResult(manifest, store.version_dir(workload.name, version), True, 0.0)

    staging = store.staging_dir(workload.name)
    (
        ray.data.read_parquet([str(f) for f in files], include_paths=True)
        .map_batches(
            mark_rows,
            batch_format="pandas",
            fn_kwargs={
                "workload_name": workload.name,
                "fractions": cfg.split_fractions,
                "seed": settings.seed,
            },
        )
        .write_parquet(str(staging / "rows"), partition_cols=[SPLIT_COLUMN])
    )
    manifest = _manifest(staging, workload, version, sources, cfg, settings.seed)
    try:
        _reconcile(manifest)
        _gate(manifest, cfg)
    except DataContractError as exc:
        kept = store.reject(staging, workload.name, version)
        raise DataContractError(f"{exc} (the run's output is kept in {kept})") from None
    path = store.publish(staging, manifest)
    return IngestResult(manifest, path, False, time.perf_counter() - started)


def _describe_source(path: Path) -> SourceFile:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataContractError(
            f"{path} is not a readable Parquet file ({exc}): re-export it or remove it "
            "from the source"
        ) from None
    return SourceFile(path=str(path), size=path.stat().st_size, sha256=file_sha256(path), rows=rows)


def _manifest(
    staging: Path,
    workload: Workload,
    version: str,
    sources: list[SourceFile],
    cfg: IngestConfig,
    seed: int,
) -> DatasetManifest:
    import pandera
    import pyarrow
    import pyarrow.parquet as pq
    import ray

    rows_dir = staging / "rows"
    files = {s: sorted((rows_dir / f"{SPLIT_COLUMN}={s}").glob("*.parquet")) for s in SPLITS}
    quarantined = sorted((rows_dir / f"{SPLIT_COLUMN}={QUARANTINE}").glob("*.parquet"))
    counts = {s: sum(pq.read_metadata(f).num_rows for f in fs) for s, fs in files.items()}
    reasons: dict[str, int] = {}
    if quarantined:
        table = pq.read_table(quarantined, columns=[REASON_COLUMN])
        reasons = table.column(REASON_COLUMN).to_pandas().value_counts().to_dict()
    any_file = next((f for fs in (*files.values(), quarantined) for f in fs), None)
    schema = pq.read_schema(any_file) if any_file else pyarrow.schema([])
    every_file = sorted(rows_dir.rglob("*.parquet"))
    content = version_id({str(f.relative_to(rows_dir)): file_sha256(f) for f in every_file})
    return DatasetManifest(
        version=version,
        workload=workload.name,
        created_at=datetime.now(UTC),
        parent=None,
        sources=sources,
        rows_in=sum(s.rows for s in sources),
        rows_valid=sum(counts.values()),
        rows_quarantined=sum(reasons.values()),
        splits=counts,
        quarantine_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        columns=[Column(name=f.name, type=str(f.type)) for f in schema],
        content_hash=content,
        config={"ingest": cfg.model_dump(), "seed": seed, "pipeline": PIPELINE_VERSION},
        libraries={
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "pandas": pd.__version__,
            "pandera": pandera.__version__,
        },
    )


def _reconcile(m: DatasetManifest) -> None:
    if m.rows_in != m.rows_valid + m.rows_quarantined:
        raise DataContractError(
            f"reconciliation failed for {m.workload}: read {m.rows_in} rows but wrote "
            f"{m.rows_valid} valid + {m.rows_quarantined} quarantined; rows were lost or "
            "duplicated, so this version is not published"
        )


def _gate(m: DatasetManifest, cfg: IngestConfig) -> None:
    share = m.rows_quarantined / m.rows_in if m.rows_in else 0.0
    if m.rows_in == 0:
        raise DataContractError(f"the sources of {m.workload} hold no rows: check --source")
    if share > cfg.max_quarantine_share:
        top = ", ".join(f"{rule} ({n})" for rule, n in list(m.quarantine_reasons.items())[:3])
        files = ", ".join(Path(s.path).name for s in m.sources)
        raise DataContractError(
            f"{share:.1%} of rows from {files} broke the contract, over the limit of "
            f"{cfg.max_quarantine_share:.1%} (ingest.max_quarantine_share); top rules: {top}"
        )


def read_split(settings: Settings, manifest: DatasetManifest, split: str) -> Any:
    """A lazy Ray Dataset of one split's feature and label columns (streamed, never pulled)."""
    import ray.data

    workload = get_workload(manifest.workload)
    path = DatasetStore(settings.datasets_dir).split_dir(manifest.workload, manifest.version, split)
    columns = [*workload.feature_columns, workload.label_column]
    return ray.data.read_parquet(str(path), columns=columns, partitioning=None)
