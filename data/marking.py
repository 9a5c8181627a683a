"""The one pass over the records: each gets its split (train, val, test), or the
quarantine with the rule it broke, its file and its record number; PII is pseudonymized
either way. :func:`ray_pass` runs it on Ray Data, a block at a time; data.pipeline runs
the steps around it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from app.errors import DataContractError
from app.workloads import Workload, get_workload
from data.pii import PiiKey, redact_series
from data.readers import ERROR, ROW, SOURCE, TEXT, Piece, RawFiles
from data.split import assign_split
from data.validate import arrow_schema, check_rows
from data.versions import QUARANTINE

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs
    from ray.data._internal.execution.interfaces import TaskContext

SPLIT_COLUMN = "split"
REASON_COLUMN = "_quarantine_reason"
RAW_COLUMN = "_raw"


@functools.cache
def _batch_contract(workload_name: str):  # noqa: ANN202 - pandera schema, once per worker
    """The contract as one batch can check it: the id's uniqueness is a property of the
    whole run, checked after the pass (:func:`duplicates_moved`), so that which
    occurrence stays never depends on where a batch happened to end."""
    workload = get_workload(workload_name)
    return workload.contract().update_column(workload.id_column, unique=False)


def mark_rows(
    batch: pd.DataFrame,
    *,
    workload_name: str,
    fractions: tuple[float, float, float],
    seed: int,
    pii_secret: bytes | None,
    sha256_of: dict[str, str],
) -> pyarrow.Table:
    """Give every record a split: train/val/test, or quarantine with the rule it broke.

    Valid rows keep the contract's typed columns, PII pseudonymized. A quarantined
    record may hold anything (a word where a number belongs), so it is kept whole as
    JSON in ``_raw`` (PII pseudonymized too) and its typed columns are null; a record
    that could not even be parsed keeps its redacted text. Nothing is lost.

    Every row keeps where it came from: ``_source``, the SHA-256 of its file (``sha256_of``
    maps a path to it; the manifest's sources name the file), and ``_row``, its record
    number there. Not the path: the same bytes give the same rows under any name.
    """
    import pyarrow

    workload = get_workload(workload_name)
    contract = _batch_contract(workload_name)
    key = PiiKey(pii_secret) if pii_secret else None
    batch = batch.reset_index(drop=True)
    where = ", ".join(batch[SOURCE].unique())
    batch[SOURCE] = batch[SOURCE].map(sha256_of)
    unparsed = batch[ERROR].notna().to_numpy()
    rows = batch.loc[~unparsed, list(contract.columns)].reset_index(drop=True)
    lineage = batch.loc[~unparsed, [SOURCE, ROW]].reset_index(drop=True)
    valid, reasons = check_rows(rows, contract, where=where)
    bad = reasons.notna().to_numpy()
    typed = arrow_schema(contract)

    valid = protect(valid, workload, key)
    good = pyarrow.Table.from_pandas(valid[typed.names], schema=typed, preserve_index=False)
    extra = {
        RAW_COLUMN: pyarrow.nulls(len(good), pyarrow.string()),
        REASON_COLUMN: pyarrow.nulls(len(good), pyarrow.string()),
        SOURCE: pyarrow.array(lineage[SOURCE][~bad], pyarrow.string()),
        ROW: pyarrow.array(lineage[ROW][~bad], pyarrow.int64()),
        SPLIT_COLUMN: pyarrow.array(
            assign_split(valid[workload.id_column], fractions, seed), pyarrow.string()
        ),
    }
    for name, column in extra.items():
        good = good.append_column(name, column)

    broken = protect(rows[bad], workload, key, everything=True)
    texts = batch.loc[unparsed, TEXT].tolist()
    quarantined = pyarrow.table(
        {
            **{f.name: pyarrow.nulls(int(bad.sum()) + len(texts), f.type) for f in typed},
            RAW_COLUMN: records_json(broken) + texts,
            REASON_COLUMN: reasons[bad].astype(str).tolist() + batch.loc[unparsed, ERROR].tolist(),
            SOURCE: lineage[SOURCE][bad].tolist() + batch.loc[unparsed, SOURCE].tolist(),
            ROW: pyarrow.array(
                lineage[ROW][bad].tolist() + batch.loc[unparsed, ROW].tolist(), pyarrow.int64()
            ),
            SPLIT_COLUMN: [QUARANTINE] * (int(bad.sum()) + len(texts)),
        },
        schema=good.schema,
    )
    return pyarrow.concat_tables([good, quarantined])


def protect(
    frame: pd.DataFrame, workload: Workload, key: PiiKey | None, *, everything: bool = False
) -> pd.DataFrame:
    """Pseudonymize the identifiers and redact the free text of ``frame`` (a copy).

    ``everything``: also redact every other column, whatever its type, for records that
    broke the contract and may hold PII anywhere (an email in the wrong column, a card
    number where the amount belongs).
    """
    if not workload.has_pii and not everything:
        return frame
    out = frame.copy()
    for column in workload.pii_identifiers:
        if key is None:
            raise DataContractError(f"{workload.name} holds PII but no PII key was given")
        out[column] = key.pseudonymize(out[column])
    if not everything:
        for column in workload.pii_text:
            out[column] = redact_series(out[column])
        return out
    for column in out.columns:
        if column in workload.pii_identifiers:
            continue
        values = out[column].astype(object)
        present = values.notna()
        text = values[present].astype(str)
        redacted = redact_series(text)
        changed = present.copy()
        changed[present] = (redacted != text).to_numpy()
        if changed.any():
            values[changed] = redacted[changed[present].to_numpy()]
            out[column] = values
    return out


def records_json(frame: pd.DataFrame) -> list[str]:
    """Each row as a JSON object; nulls (NaN, NaT, None) as null, so it is valid JSON."""
    plain = frame.astype(object).where(frame.notna(), None)
    return [json.dumps(r, default=str, allow_nan=False) for r in plain.to_dict(orient="records")]


Mark = Callable[[pd.DataFrame], "pyarrow.Table"]


@dataclass(frozen=True)
class Output:
    """Where the pass writes. Each split's rows go under ``rows`` (``split=<name>/``,
    Hive style). For the id's uniqueness across the run, the id, lineage and file of
    every valid row also go under ``ids``, one file a task, with the bucket its id
    hashes to (``_bucket``, of ``buckets``; 0: the id need not be unique), a row group
    a bucket, so that each bucket can be read alone."""

    rows: Path
    ids: Path
    id_column: str
    buckets: int


Pass = Callable[["pyarrow.fs.FileSystem", list[Piece], list[str], Output, Mark], None]
FILE_COLUMN = "_file"
BUCKET_COLUMN = "_bucket"


def write_rows(tables: Iterable[pyarrow.Table], out: Output) -> None:
    """Write one read task's marked tables as they come, a row group each. Its files
    are named for its first row (``part-<file>-<record>``), so names depend on what was
    read, never on how the work was scheduled, and a task that runs again overwrites
    what its first attempt left. (Ray Data's write step keeps a task's blocks until the
    task ends, so on Ray a task holds one piece of a file, not one block.) Each file's
    footer holds its part of the content hash (:func:`rows_part`)."""
    import pyarrow
    import pyarrow.compute as pc

    parts: dict[Path, _Part] = {}
    lineage: list[pyarrow.Table] = []
    name = None

    def write(path: Path, table: pyarrow.Table) -> None:
        if path not in parts:
            parts[path] = _Part(path, table.schema)
        parts[path].write(table)

    try:
        for table in tables:
            if table.num_rows == 0:
                continue
            name = name or f"part-{table[SOURCE][0].as_py()[:16]}-{table[ROW][0].as_py():012d}"
            splits = table.column(SPLIT_COLUMN)
            for split in pc.unique(splits).to_pylist():
                part = table.filter(pc.equal(splits, split)).drop_columns([SPLIT_COLUMN])
                file = f"{SPLIT_COLUMN}={split}/{name}.parquet"
                write(out.rows / file, part)
                if out.buckets and split != QUARANTINE:
                    ids = part.select([out.id_column, SOURCE, ROW])
                    ids = ids.append_column(FILE_COLUMN, pyarrow.array([file] * len(ids)))
                    bucket = id_buckets(ids.column(0), out.buckets)
                    lineage.append(ids.append_column(BUCKET_COLUMN, pyarrow.array(bucket)))
        if lineage:
            ids = pyarrow.concat_tables(lineage).sort_by(BUCKET_COLUMN)
            bounds = np.flatnonzero(np.diff(ids.column(BUCKET_COLUMN).to_numpy())) + 1
            for start, stop in zip([0, *bounds], [*bounds, ids.num_rows], strict=True):
                write(out.ids / f"{name}.parquet", ids.slice(start, stop - start))
    finally:
        for part in parts.values():
            part.close()


def write_whole(path: Path, table: pyarrow.Table, part: np.ndarray | None = None) -> None:
    """One output file written at once (the uniqueness check's rewrites), with the
    footer :func:`write_rows` gives its files; ``part``: the rows' part, if known."""
    whole = _Part(path, table.schema)
    try:
        whole.write(table, part)
    finally:
        whole.close()


def footer_part(path: Path) -> np.ndarray:
    """The part of the content hash an output file's footer holds (:func:`rows_part`)."""
    import pyarrow.parquet as pq

    return np.array(json.loads(pq.read_metadata(path).metadata[ROWS_PART_KEY]), np.uint64)


# Each output file's footer holds its rows' part of the version's content hash, so that
# the hash (data.pipeline.rows_digest) reads footers, not rows: the row count and two
# sums (mod 2**64) of the rows' 64-bit hashes, each under its own key (hash_pandas_object
# takes 16 bytes). Sums, so that they add up the same however rows are cut into files.
ROWS_PART_KEY = b"scaledl.rows_part"
_ROW_HASH_KEYS = ("scaledl-rows-a01", "scaledl-rows-b02")


def rows_part(table: pyarrow.Table) -> np.ndarray:
    """[rows, sum under the first key, sum under the second] of ``table``, as uint64."""
    frame = table.to_pandas()
    sums = [
        pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy().sum(dtype=np.uint64)
        for key in _ROW_HASH_KEYS
    ]
    return np.array([len(frame), *sums], np.uint64)  # uint64 arrays wrap around silently


class _Part:
    """An output Parquet file written a table at a time, its rows' part in its footer."""

    def __init__(self, path: Path, schema: pyarrow.Schema) -> None:
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(path, schema)
        self.part = np.zeros(1 + len(_ROW_HASH_KEYS), np.uint64)

    def write(self, table: pyarrow.Table, part: np.ndarray | None = None) -> None:
        self.writer.write_table(table)
        self.part += rows_part(table) if part is None else part

    def close(self) -> None:
        self.writer.add_key_value_metadata({ROWS_PART_KEY: json.dumps(self.part.tolist())})
        self.writer.close()


def id_buckets(ids: pyarrow.ChunkedArray, buckets: int) -> np.ndarray:
    """Which bucket each id hashes to: the same id, the same bucket, in any task."""
    hashes = pd.util.hash_array(ids.to_numpy(zero_copy_only=False).astype(str))
    return (hashes % np.uint64(buckets)).astype(np.int64)


class RowsSink(Datasink[None]):
    """Ray Data's end of the pass: :func:`write_rows` for each task's blocks. (Ray's own
    Parquet sink lists a task's blocks first, so a task would hold a whole file.)"""

    def __init__(self, out: Output) -> None:
        self.out = out

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> None:
        write_rows((BlockAccessor.for_block(b).to_arrow() for b in blocks), self.out)


def ray_pass(
    filesystem: pyarrow.fs.FileSystem,
    pieces: list[Piece],
    columns: list[str],
    out: Output,
    mark: Mark,
) -> None:
    """The streaming pass on Ray Data: read, mark and write, a block at a time, one task
    per piece of a file (data/readers.py), so a large file uses every core."""
    import ray.data

    context = ray.data.DataContext.get_current()
    limits = context.execution_options.resource_limits
    at_once = tasks_at_once()
    if at_once is not None:  # for this pass only; the caller's context is left as it was
        context.execution_options.resource_limits = limits.copy(cpu=at_once)
    try:
        (
            ray.data.read_datasource(
                RawFiles(pieces, columns=columns, filesystem=filesystem),
                # One read task per piece, not split further: then read, mark and write
                # fuse into one task and no block crosses the object store.
                override_num_blocks=len(pieces),
            )
            .map_batches(
                mark,
                batch_size=None,  # a block as read: never concatenated with another piece's
                batch_format="pandas",
            )
            .write_datasink(RowsSink(out))
        )
    finally:
        context.execution_options.resource_limits = limits


def tasks_at_once() -> int | None:
    """How many pass tasks may run at once: one a core where the cluster is this host
    alone and holds more CPUs than it has cores (a local cluster gets at least 4, see
    app.runtime.MIN_LOCAL_CPUS, so that training and serving can be placed); else as
    many as Ray places (None). The pass is CPU work through and through: on 2 cores, 4
    tasks at once ran 4 M CSV rows in 50.0 s and 2 in 45.6 s, with 1 GB less memory."""
    import os

    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    cores = os.cpu_count() or 1
    if len(nodes) != 1 or nodes[0]["NodeManagerAddress"] != ray.util.get_node_ip_address():
        return None
    return cores if nodes[0]["Resources"].get("CPU", 0) > cores else None
