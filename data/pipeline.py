"""The ingest pipeline: raw files -> contract -> PII -> split -> versioned dataset.

One streaming pass of Ray Data reads every record once (data/readers.py), checks it
against the workload's contract, pseudonymizes its PII, and writes it once: into the
partition of its split, or into the quarantine with the rule it broke, its file and its
record number (data/marking.py). Then, on the written files only:

- ids repeated across batches are moved to the quarantine (the contract's uniqueness);
- counts per source file are reconciled with what each file holds;
- the preprocessor is fitted on the training split, and the column statistics that the
  drift monitor uses as reference are taken from it;
- the version is published, or rejected (and kept for inspection) by the quarantine gate.

Published, reused or rejected, the run's figures (records in, valid, quarantined, the
quarantine share) are in its manifest, and pushed to the Prometheus pushgateway when
``ingest.pushgateway_url`` is set (data/metrics.py).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from app.errors import DataContractError, find_scaledl_error
from app.logs import event as log_event
from app.logs import events
from app.sections import IngestConfig
from app.settings import Settings
from app.workloads import Workload
from data.features import ColumnStats, Preprocessor, column_stats, fit_preprocessor
from data.marking import (
    BUCKET_COLUMN,
    FILE_COLUMN,
    RAW_COLUMN,
    REASON_COLUMN,
    SPLIT_COLUMN,
    Output,
    Pass,
    footer_part,
    mark_rows,
    ray_pass,
    records_json,
    rows_part,
    write_whole,
)
from data.pii import load_pii_key
from data.readers import ROW, SOURCE, Piece
from data.sources import (
    RawSource,
    builtin_raw_file,
    describe_file,
    file_digest,
    local_source,
    read_through,
)
from data.validate import is_text
from data.versions import (
    PREPROCESSOR,
    QUARANTINE,
    QUARANTINED_FILES,
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

PIPELINE_VERSION = "3"  # 3: files named for their first row, pieces of files, a multiset hash
STATS_BATCH_ROWS = 65_536
ID_BUCKET_ROWS = 1_000_000  # ids per bucket of the uniqueness check, on average
# Settings that say where a run's figures go, or whether a run fails, not what its
# version holds: left out of the version id (a new gateway is not a new dataset) and of
# the manifest (a URL may carry credentials). on_unreadable_file only decides whether a
# run with an unreadable file fails; the manifest lists such a file either way.
NOT_CONTENT = frozenset({"pushgateway_url", "max_dataset_age_s", "on_unreadable_file"})


@dataclass(frozen=True)
class IngestResult:
    manifest: DatasetManifest
    path: Path
    reused: bool
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.manifest.rows_in / self.seconds if self.seconds > 0 else float("nan")


def ingest(
    settings: Settings,
    workload: Workload,
    source: RawSource | None = None,
    *,
    parent_ref: str | None = None,
    run_pass: Pass = ray_pass,
) -> IngestResult:
    """Turn raw files (default: the workload's built-in set) into a dataset version.

    The same input bytes give the same version, whatever the files are named or the
    order they are listed in: the same id, file names, rows, content hash and
    statistics. ``parent_ref`` names the version this one derives from (see
    :func:`parent_of`). ``run_pass`` is the engine of the one pass over the records;
    the benchmark swaps in a single-process one to measure what Ray Data adds.
    """
    started = time.perf_counter()
    cfg = settings.ingest
    key = (
        load_pii_key(
            settings.pii_key.get_secret_value() if settings.pii_key else None,
            settings.pii_key_file,
            dev=settings.dev,
            dev_path=settings.dev_pii_key_file,
        )
        if workload.has_pii
        else None
    )
    source = source or local_source(
        builtin_raw_file(workload, settings.storage_root.resolve() / "raw")
    )
    described = [_describe(source, path, workload, cfg.on_unreadable_file) for path in source.paths]
    pieces_of = {file.path: pieces for file, pieces in described}
    sources = in_content_order([file for file, _ in described])
    # The pass reads the files in content order, so that the output (file names, which
    # occurrence of an id stays) never depends on how the files were named or listed.
    readable = [s for s in sources if s.unreadable is None]
    if not readable:
        raise DataContractError(
            f"none of the {len(sources)} files of the source can be read: "
            + "; ".join(s.unreadable or "" for s in sources[:3])
        )
    version = version_id(
        {
            "pipeline": PIPELINE_VERSION,
            "workload": workload.name,
            "sources": sorted(s.sha256 for s in sources),
            "contract": contract_fingerprint(workload.contract()),
            "config": cfg.model_dump(exclude=NOT_CONTENT),
            "seed": settings.seed,
            "pii_key": key.fingerprint if key else None,
        }
    )
    store = DatasetStore(settings.datasets_dir)
    if store.version_dir(workload.name, version).exists():
        manifest = store.get(workload.name, version)
        report_run(cfg, store, manifest, "reused")
        return IngestResult(manifest, store.version_dir(workload.name, version), True, 0.0)
    parent = parent_of(store, workload.name, sources, parent_ref)

    staging = store.staging_dir(workload.name)
    sources = [_kept(source, s, staging, workload) if s.unreadable else s for s in sources]
    mark = functools.partial(
        mark_rows,
        workload_name=workload.name,
        fractions=cfg.split_fractions,
        seed=settings.seed,
        pii_secret=key.secret if key else None,
        sha256_of={s.path: s.sha256 for s in readable},
    )
    try:
        pieces = [piece for s in readable for piece in pieces_of[s.path]]
        unique = workload.contract().columns[workload.id_column].unique
        rows_in = sum(s.rows for s in readable)
        out = Output(
            rows=staging / "rows",
            ids=staging / "ids",
            id_column=workload.id_column,
            buckets=-(-rows_in // ID_BUCKET_ROWS) if unique else 0,
        )
        out.rows.mkdir(parents=True)  # there even when no file holds a record
        run_pass(source.filesystem, pieces, list(workload.contract().columns), out, mark)
        duplicates_moved(out, workload, [s.sha256 for s in sources])
        shutil.rmtree(out.ids, ignore_errors=True)
        preprocessor, stats = _fit_on_train(staging / "rows", workload)
        if preprocessor is not None:
            (staging / PREPROCESSOR).write_text(preprocessor.model_dump_json(indent=2))
    except Exception as exc:  # Ray wraps what a task raised; surface our own error
        shutil.rmtree(staging, ignore_errors=True)
        found = find_scaledl_error(exc)
        if found is None:
            raise
        raise found from None
    manifest = _manifest(staging, workload, version, sources, cfg, settings.seed, stats)
    manifest = manifest.model_copy(update={"parent": parent, "pii_key": key and key.fingerprint})
    try:
        reconcile(manifest)
        _gate(manifest, cfg)
    except DataContractError as exc:
        kept = store.reject(staging, manifest)
        report_run(cfg, store, manifest, "rejected")
        raise DataContractError(f"{exc} (the run's output is kept in {kept})") from None
    path = store.publish(staging, manifest)
    report_run(cfg, store, manifest, "published")
    return IngestResult(manifest, path, False, time.perf_counter() - started)


def report_run(cfg: IngestConfig, store: DatasetStore, run: DatasetManifest, outcome: str) -> None:
    """The run's JSON event line (app/logs.py) and its figures to the pushgateway.

    ``outcome``: published, reused (the version existed) or rejected (by the gate; the
    figures are the rejected run's). Counts only: a reason may quote a record."""
    log_event(
        events("data"),
        "ingest.run",
        outcome=outcome,
        workload=run.workload,
        run_id=run.run_id,
        version=run.version,
        parent=run.parent,
        rows_in=run.rows_in,
        rows_valid=run.rows_valid,
        rows_quarantined=run.rows_quarantined,
        quarantine_share=round(run.quarantine_share, 6),
        files_quarantined=sum(s.unreadable is not None for s in run.sources),
    )
    push_figures(cfg, store, run)


def push_figures(cfg: IngestConfig, store: DatasetStore, run: DatasetManifest) -> None:
    """The run's figures and the workload's freshness to the pushgateway, if one is set."""
    if cfg.pushgateway_url is None:
        return
    from data.metrics import push_ingest_figures

    latest = next(iter(store.manifests(run.workload)), None)
    push_ingest_figures(cfg.pushgateway_url, run, latest, cfg)


def _describe(
    source: RawSource, path: str, workload: Workload, unreadable: str
) -> tuple[SourceFile, list[Piece]]:
    """One raw file, checked, and the pieces the pass reads it in. ``unreadable``
    (ingest.on_unreadable_file): 'fail' raises for a file that cannot be read;
    'quarantine' reads it through once, as the pass will, and describes one that cannot
    be read with the reason (the pass leaves it out)."""
    try:
        file = describe_file(source, path, workload)
        if unreadable == "quarantine":
            read_through(source, file.pieces, list(workload.contract().columns))
    except DataContractError as exc:
        if unreadable == "fail":
            raise
        size, sha256 = file_digest(source, path)
        return SourceFile(path=path, size=size, sha256=sha256, rows=0, unreadable=str(exc)), []
    return SourceFile(path=path, size=file.size, sha256=file.sha256, rows=file.records), file.pieces


def _kept(source: RawSource, file: SourceFile, staging: Path, workload: Workload) -> SourceFile:
    """An unreadable file, copied whole into the version's quarantine; for a workload
    with PII it stays where it is, named by path and SHA-256: a copy would put its raw
    records outside the keyed stores."""
    if workload.has_pii:
        return file
    kept = Path(QUARANTINED_FILES) / f"{file.sha256}{Path(file.path).suffix}"
    (staging / kept).parent.mkdir(parents=True, exist_ok=True)
    with (
        source.filesystem.open_input_stream(file.path) as src,
        (staging / kept).open("wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    return file.model_copy(update={"kept": str(kept)})


def in_content_order(sources: list[SourceFile]) -> list[SourceFile]:
    """The files sorted by their SHA-256: rows carry it as their lineage (``_source``),
    so two files with the same bytes would be one; the second is refused."""
    ordered = sorted(sources, key=lambda s: s.sha256)
    for first, second in zip(ordered, ordered[1:], strict=False):
        if first.sha256 == second.sha256:
            raise DataContractError(
                f"{second.path} holds the same bytes as {first.path} (sha256 "
                f"{first.sha256[:12]}…): every record would come twice; remove one of them "
                "from the source"
            )
    return ordered


def parent_of(
    store: DatasetStore, workload: str, sources: list[SourceFile], ref: str | None
) -> str | None:
    """The version a new one derives from: ``ref`` (``--parent``) when given, else the
    newest version whose input files are all among the new one's (the new one extends
    it), else none."""
    if ref is not None:
        return store.get(workload, ref).version
    inputs = {s.sha256 for s in sources}
    extended = (m for m in store.manifests(workload) if {s.sha256 for s in m.sources} < inputs)
    found = next(extended, None)
    return found.version if found else None


def duplicates_moved(out: Output, workload: Workload, source_order: list[str]) -> int:
    """Enforce the id's uniqueness across the whole run, not just within a batch.

    The first occurrence (by source file, in ``source_order`` of their SHA-256s, then
    record number) stays; later ones move to the quarantine. The pass hashed every valid
    row's id, lineage and file into buckets (:class:`Output`); each bucket is read alone
    for its repeated ids, so memory holds one bucket (``ID_BUCKET_ROWS`` rows or so) and
    the repeated ids, whatever the run's size. Then only the files that hold a later
    occurrence are rewritten, one at a time. Returns how many rows moved.
    """
    import pyarrow
    import pyarrow.compute as pc
    import pyarrow.dataset
    import pyarrow.parquet as pq

    id_column = workload.id_column
    repeated = []
    if out.buckets and out.ids.is_dir():
        lineage = pyarrow.dataset.dataset(out.ids, format="parquet")
        for bucket in range(out.buckets):  # a row group per bucket and file: the rest skipped
            ids = lineage.to_table(filter=pc.field(BUCKET_COLUMN) == bucket).to_pandas()
            repeated.append(ids[ids.duplicated(id_column, keep=False)])
    candidates = pd.concat(repeated, ignore_index=True) if repeated else pd.DataFrame()
    if candidates.empty:
        return 0
    order = {sha256: i for i, sha256 in enumerate(source_order)}
    candidates["_order"] = candidates[SOURCE].map(order)
    candidates = candidates.sort_values(["_order", ROW], kind="stable")
    later = candidates[candidates.duplicated(id_column, keep="first")]
    moved = []
    for file, gone in later.groupby(FILE_COLUMN, sort=True):
        table = pq.read_table(out.rows / file)
        keys = pc.binary_join_element_wise(
            table.column(SOURCE), pc.cast(table.column(ROW), pyarrow.string()), "#"
        )
        mask = pc.is_in(keys, pyarrow.array((gone[SOURCE] + "#" + gone[ROW].astype(str)).tolist()))
        gone_rows = table.filter(mask)
        moved.append(_as_duplicate(gone_rows, workload))
        # The footer's part less the rows that go (sums mod 2**64): not every row hashed again.
        part = footer_part(out.rows / file) - rows_part(gone_rows)
        write_whole(out.rows / file, table.filter(pc.invert(mask)), part)
    merged = pyarrow.concat_tables(moved)
    write_whole(out.rows / f"{SPLIT_COLUMN}={QUARANTINE}" / "duplicates.parquet", merged)
    return merged.num_rows


def _as_duplicate(rows: pyarrow.Table, workload: Workload) -> pyarrow.Table:
    """Valid-looking rows whose id came earlier: quarantine rows with the uniqueness rule."""
    import pyarrow

    frame = rows.to_pandas()
    raw = records_json(frame[list(workload.contract().columns)])
    out = rows.drop_columns([RAW_COLUMN, REASON_COLUMN])
    nulls = {
        name: pyarrow.nulls(len(out), out.schema.field(name).type)
        for name in workload.contract().columns
    }
    for name, column in nulls.items():
        out = out.set_column(out.schema.get_field_index(name), name, column)
    out = out.append_column(RAW_COLUMN, pyarrow.array(raw, pyarrow.string()))
    out = out.append_column(
        REASON_COLUMN,
        pyarrow.array([f"{workload.id_column}: field_uniqueness"] * len(out), pyarrow.string()),
    )
    return out.select(rows.schema.names)


def _train_batches(rows_dir: Path, columns: list[str]) -> Callable[[], Iterator[pd.DataFrame]]:
    """The train split in a fixed order and fixed batches, whatever order the writer left
    rows in: files by name (which is lineage order), rows by lineage. The statistics'
    sample and float sums, and the preprocessor's, depend on it."""
    import pyarrow
    import pyarrow.parquet as pq

    def batches() -> Iterator[pd.DataFrame]:
        held: list[pyarrow.Table] = []  # rows carried over to the next file's
        for f in sorted((rows_dir / f"{SPLIT_COLUMN}=train").glob("*.parquet")):
            table = pq.read_table(f, columns=[*columns, SOURCE, ROW])
            held.append(table.sort_by([(SOURCE, "ascending"), (ROW, "ascending")]).select(columns))
            # Batches of STATS_BATCH_ROWS across files, so that float sums are the same
            # however the pass cut its output into files.
            rows = pyarrow.concat_tables(held)
            whole = rows.num_rows // STATS_BATCH_ROWS * STATS_BATCH_ROWS
            for start in range(0, whole, STATS_BATCH_ROWS):
                yield rows.slice(start, STATS_BATCH_ROWS).to_pandas()
            held = [rows.slice(whole)]
        if held and held[0].num_rows:
            yield held[0].to_pandas()

    return batches


def _fit_on_train(
    rows_dir: Path, workload: Workload
) -> tuple[Preprocessor | None, dict[str, ColumnStats]]:
    """The preprocessor (fitted workloads) and the column statistics, from the train split."""
    import pyarrow.parquet as pq

    contract = workload.contract()
    hidden = {workload.id_column, *workload.pii_identifiers, *workload.pii_text}
    described = [c for c in contract.columns if c not in hidden]
    text = {c for c in described if is_text(contract.columns[c])}
    categorical = [*sorted(text), workload.label_column]
    numeric = [c for c in described if c not in categorical]
    batches = _train_batches(rows_dir, described)
    rows = sum(
        pq.read_metadata(f).num_rows for f in (rows_dir / f"{SPLIT_COLUMN}=train").glob("*.parquet")
    )
    stats = column_stats(batches(), numeric=numeric, categorical=categorical, rows=rows)
    preprocessor = None
    if workload.fitted:
        preprocessor = fit_preprocessor(
            workload.name,
            (workload.derive(b) for b in batches()),
            numeric=workload.numeric_features,
            categorical=workload.categorical_features,
        )
    return preprocessor, stats


def _manifest(
    staging: Path,
    workload: Workload,
    version: str,
    sources: list[SourceFile],
    cfg: IngestConfig,
    seed: int,
    stats: dict[str, ColumnStats],
) -> DatasetManifest:
    import pandera
    import pyarrow
    import pyarrow.parquet as pq
    import ray

    rows_dir = staging / "rows"
    files = {s: sorted((rows_dir / f"{SPLIT_COLUMN}={s}").glob("*.parquet")) for s in SPLITS}
    quarantined = sorted((rows_dir / f"{SPLIT_COLUMN}={QUARANTINE}").glob("*.parquet"))
    counts = {s: sum(pq.read_metadata(f).num_rows for f in fs) for s, fs in files.items()}
    reasons: Counter = Counter()
    for f in quarantined:
        reasons.update(_value_counts(pq.read_table(f, columns=[REASON_COLUMN]).column(0)))
    per_file = {kind: Counter() for kind in ("valid", "quarantined")}
    valid_files = [f for fs in files.values() for f in fs]
    for kind, paths in (("valid", valid_files), ("quarantined", quarantined)):
        for f in paths:
            per_file[kind].update(_value_counts(pq.read_table(f, columns=[SOURCE]).column(0)))
    sources = [
        s.model_copy(
            update={
                "rows_valid": per_file["valid"][s.sha256],
                "rows_quarantined": per_file["quarantined"][s.sha256],
            }
        )
        for s in sources
    ]
    any_file = next((f for fs in (*files.values(), quarantined) for f in fs), None)
    schema = pq.read_schema(any_file) if any_file else pyarrow.schema([])
    content = rows_digest(rows_dir)
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
        stats=stats,
        content_hash=content,
        config={
            "ingest": cfg.model_dump(exclude=NOT_CONTENT),
            "seed": seed,
            "pipeline": PIPELINE_VERSION,
        },
        libraries={
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "pandas": pd.__version__,
            "pandera": pandera.__version__,
        },
    )


def rows_digest(rows_dir: Path) -> str:
    """12 hex digits that stand for the rows of every partition, whatever the files are
    named or cut, and whatever order rows are in: a SHA-256 over each partition's name,
    its column names, and the sum of its files' parts (data.marking.rows_part: the row
    count and two keyed sums of the rows' hashes, a multiset hash), read from their
    footers, where the pass wrote them."""
    import pyarrow.parquet as pq

    digest = hashlib.sha256()
    for partition in sorted(p for p in rows_dir.iterdir() if p.is_dir()):
        names, total = None, np.zeros(3, np.uint64)
        for f in sorted(partition.glob("*.parquet")):
            names = names or pq.read_schema(f).names
            total += footer_part(f)
        rows, sums = int(total[0]), total[1:]
        digest.update(f"{partition.name}\n{names}\n{rows}\n".encode() + sums.tobytes())
    return digest.hexdigest()[:12]


def _value_counts(column: pyarrow.ChunkedArray) -> dict[str, int]:
    import pyarrow.compute as pc

    counted = pc.value_counts(column)
    names, counts = counted.field("values").to_pylist(), counted.field("counts").to_pylist()
    return dict(zip(names, counts, strict=True))


def reconcile(m: DatasetManifest) -> None:
    """Every record of every file is valid or quarantined, exactly once; else no version."""
    off = [s for s in m.sources if s.rows != s.rows_valid + s.rows_quarantined]
    if off or m.rows_in != m.rows_valid + m.rows_quarantined:
        detail = "; ".join(
            f"{Path(s.path).name}: {s.rows} in, {s.rows_valid} valid + "
            f"{s.rows_quarantined} quarantined"
            for s in off[:5]
        )
        raise DataContractError(
            f"reconciliation failed for {m.workload}: read {m.rows_in} rows but wrote "
            f"{m.rows_valid} valid + {m.rows_quarantined} quarantined ({detail or 'totals'}); "
            "rows were lost or duplicated, so this version is not published"
        )


def _gate(m: DatasetManifest, cfg: IngestConfig) -> None:
    share = m.quarantine_share
    if m.rows_in == 0:
        raise DataContractError(f"the sources of {m.workload} hold no rows: check --source")
    if share > cfg.max_quarantine_share:
        top = ", ".join(f"{rule} ({n})" for rule, n in list(m.quarantine_reasons.items())[:3])
        worst = sorted(m.sources, key=lambda s: -s.rows_quarantined / max(s.rows, 1))
        files = ", ".join(
            f"{Path(s.path).name} ({s.rows_quarantined / max(s.rows, 1):.1%})" for s in worst[:3]
        )
        raise DataContractError(
            f"{share:.1%} of rows from {files} broke the contract, over the limit of "
            f"{cfg.max_quarantine_share:.1%} (ingest.max_quarantine_share); top rules: {top}"
        )
