"""The ingest pipeline: raw Parquet -> contract check -> split -> versioned dataset.

One streaming pass of Ray Data: every row is read once, checked once, and written once
into the partition of its split, or into the quarantine partition with the rule it broke.
Counts come from the written files' metadata and must reconcile with the input.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from app.errors import DataContractError, find_scaledl_error
from app.settings import IngestConfig, Settings
from app.workloads import Workload, get_workload
from data.sources import builtin_raw_file, file_sha256
from data.split import assign_split
from data.validate import arrow_schema, check_rows
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

if TYPE_CHECKING:
    import pyarrow

PIPELINE_VERSION = "1"
SPLIT_COLUMN = "split"
REASON_COLUMN = "_quarantine_reason"
RAW_COLUMN = "_raw"
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
) -> pyarrow.Table:
    """Give every row a split: train/val/test, or quarantine with the rule it broke.

    Valid rows keep the contract's typed columns. A quarantined row may hold anything (a
    word where a number belongs), so it is kept whole as JSON in ``_raw`` and its typed
    columns are null: nothing is lost, whatever its types.
    """
    import pyarrow

    workload = get_workload(workload_name)
    contract = _contract(workload_name)
    sources = batch.pop("path").map(lambda p: Path(p).name).reset_index(drop=True)
    valid, reasons = check_rows(batch, contract, where=", ".join(sources.unique()))
    bad = reasons.notna().to_numpy()
    typed = arrow_schema(contract)

    good = pyarrow.Table.from_pandas(valid[typed.names], schema=typed, preserve_index=False)
    good = good.append_column(RAW_COLUMN, pyarrow.nulls(len(good), pyarrow.string()))
    good = good.append_column(REASON_COLUMN, pyarrow.nulls(len(good), pyarrow.string()))
    good = good.append_column(SOURCE_COLUMN, pyarrow.array(sources[~bad], pyarrow.string()))
    split = assign_split(valid[workload.id_column], fractions, seed)
    good = good.append_column(SPLIT_COLUMN, pyarrow.array(split, pyarrow.string()))

    raw = batch.reset_index(drop=True)[bad]
    quarantined = pyarrow.table(
        {
            **{f.name: pyarrow.nulls(len(raw), f.type) for f in typed},
            RAW_COLUMN: [json.dumps(r, default=str) for r in raw.to_dict(orient="records")],
            REASON_COLUMN: reasons[bad].astype(str).tolist(),
            SOURCE_COLUMN: sources[bad].tolist(),
            SPLIT_COLUMN: [QUARANTINE] * len(raw),
        },
        schema=good.schema,
    )
    return pyarrow.concat_tables([good, quarantined])


def ingest(
    settings: Settings, workload: Workload, source_files: list[Path] | None = None
) -> IngestResult:
    """Turn raw files (default: the workload's built-in set) into a dataset version."""
    import ray.data

    started = time.perf_counter()
    cfg = settings.ingest
    files = source_files or [builtin_raw_file(workload, settings.storage_root.resolve() / "raw")]
    sources = [_describe_source(f, workload) for f in files]
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
    try:
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
    except Exception as exc:  # Ray wraps what a task raised; surface our own error
        shutil.rmtree(staging, ignore_errors=True)
        found = find_scaledl_error(exc)
        if found is None:
            raise
        raise found from None
    manifest = _manifest(staging, workload, version, sources, cfg, settings.seed)
    try:
        _reconcile(manifest)
        _gate(manifest, cfg)
    except DataContractError as exc:
        kept = store.reject(staging, workload.name, version)
        raise DataContractError(f"{exc} (the run's output is kept in {kept})") from None
    path = store.publish(staging, manifest)
    return IngestResult(manifest, path, False, time.perf_counter() - started)


def _describe_source(path: Path, workload: Workload) -> SourceFile:
    """Size, hash and row count of a raw file, after checking it has the right columns."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        columns = set(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataContractError(
            f"{path} is not a readable Parquet file ({exc}): re-export it or remove it "
            "from the source"
        ) from None
    expected = set(workload.contract().columns)
    if columns != expected:
        missing, extra = sorted(expected - columns), sorted(columns - expected)
        raise DataContractError(
            f"{path.name}: "
            + "; ".join(
                [f"missing column {c!r}" for c in missing]
                + [f"unexpected column {c!r}" for c in extra]
            )
            + " (fix the file or the workload's contract)"
        )
    rows = metadata.num_rows
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
    if not manifest.splits.get(split):
        raise DataContractError(
            f"split {split!r} of dataset {manifest.workload} {manifest.version} has no rows: "
            "ingest more data or change ingest.split_fractions"
        )
    columns = [*workload.feature_columns, workload.label_column]
    return ray.data.read_parquet(str(path), columns=columns, partitioning=None)
