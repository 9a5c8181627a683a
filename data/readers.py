"""Reading raw files for Ray Data: Parquet, CSV and JSON lines, with nothing dropped.

A file is read in :class:`Piece` s, each one read task: a byte range of whole lines of
a CSV or JSON lines file, or a range of row groups of a Parquet file
(data/sources.describe_file cuts them while it hashes the file). So memory is bounded
by a piece, not by a file, and one large file keeps every core busy. :class:`RawFiles`
is the Ray Data datasource of a run's pieces. Every block it yields holds the file's
columns plus four of its own:

- ``_source``: the file the row came from;
- ``_row``: its 1-based record number there (the physical line for CSV and JSON lines,
  the header being line 1 of a CSV; the row index + 1 for Parquet);
- ``_error``: why the record could not be parsed at all, else null;
- ``_text``: for such a record, its line with emails, card numbers and IPs redacted.

A record that cannot be parsed (a CSV line with the wrong number of fields, a line that
is not JSON or not UTF-8, a cut-off last line) is not skipped: it travels on with
``_error`` set and ends in the quarantine. CSV values are read as text, so a word where
a number belongs is the contract's business, row by row, not a failure of the file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from ray.data.datasource import Datasource, ReadTask

from app.errors import DataContractError
from data.pii import redact_fragments
from data.validate import mismatch

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs

SOURCE = "_source"
ROW = "_row"
ERROR = "_error"
TEXT = "_text"
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PIECE_BYTES = 16 << 20  # of a CSV or JSON lines file: about 160,000 transactions in CSV
PIECE_ROWS = 262_144  # of a Parquet file, in whole row groups
# Rows marked at once. A piece is one block: each block pays the contract check's and
# the redaction's fixed costs, and a 16 MiB CSV piece took 1.31-1.35 s in one block of
# 164,000 rows against 1.51-1.58 s in blocks of 65,536. Its write task holds the whole
# piece's output anyway (see data.marking.write_rows).
BLOCK_ROWS = PIECE_ROWS
BOM = b"\xef\xbb\xbf"  # Excel's UTF-8 exports start with one
MAX_TEXT = 500  # characters of an unparseable line kept (redacted) in the quarantine
QUOTED_LINE_BREAKS = "quoted values with line breaks are not supported: re-export without them"


def file_format(path: str) -> str | None:
    return EXTENSIONS.get(PurePosixPath(path).suffix.lower())


@dataclass(frozen=True)
class Piece:
    """What one read task reads of one file: bytes ``[start, stop)`` that begin and end
    on a line boundary (CSV, JSON lines), or row groups ``[start, stop)`` (Parquet);
    ``first`` is the record number (``_row``) of its first record."""

    path: str
    start: int
    stop: int
    first: int


class RawFiles(Datasource):
    """The pieces of one workload's raw files, one read task each, in the order given;
    ``columns`` are the contract's columns."""

    def __init__(
        self, pieces: list[Piece], *, columns: list[str], filesystem: pyarrow.fs.FileSystem
    ) -> None:
        super().__init__()
        self.pieces, self.columns, self.filesystem = pieces, columns, filesystem

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, **_: object) -> list[ReadTask]:
        from ray.data.block import BlockMetadata

        def task(piece: Piece) -> ReadTask:
            fs, columns = self.filesystem, self.columns
            return ReadTask(
                lambda: read_piece(fs, piece, columns),
                BlockMetadata(
                    num_rows=None, size_bytes=None, input_files=[piece.path], exec_stats=None
                ),
            )

        return [task(p) for p in self.pieces]


def read_piece(
    filesystem: pyarrow.fs.FileSystem, piece: Piece, columns: list[str]
) -> Iterator[pd.DataFrame]:
    """The blocks of one piece of a file, by the file's extension."""
    kind, path = file_format(piece.path), piece.path
    with filesystem.open_input_file(path) as f:
        if kind == "parquet":
            yield from read_parquet(f, path, columns, range(piece.start, piece.stop), piece.first)
            return
        if kind not in ("csv", "jsonl"):
            raise DataContractError(f"{path}: unsupported file type; use .parquet, .csv or .jsonl")
        f.seek(piece.start)
        data = f.read(piece.stop - piece.start)
        if kind == "csv" and piece.stop < f.size():
            _refuse_a_quote_open_at_the_cut(data, path)
        if kind == "jsonl":
            yield from read_jsonl(data, path, columns, first_line=piece.first)
        elif piece.start == 0:
            yield from read_csv(data, path, columns)
        else:  # the header, then this piece's lines: its first line is line `first`
            f.seek(0)
            yield from read_csv(first_line(f) + data, path, columns, first_line=piece.first - 1)


def _refuse_a_quote_open_at_the_cut(data: bytes, path: str) -> None:
    """A piece that ends inside a quoted value (a line break in quotes, right at the
    cut) would parse cleanly on both sides of it, as two cut records: refuse the file as
    read_csv refuses a quoted line break inside a piece."""
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 :]
    if b'"' in last and _quote_left_open(last):
        raise DataContractError(f"{path}: {QUOTED_LINE_BREAKS}")


def _quote_left_open(line: bytes) -> bool:
    """Whether a CSV line ends inside a quoted field: a quote opens one only at a
    field's start, and ``""`` inside is an escaped quote (pyarrow's default dialect)."""
    quoted, at_start, i = False, True, 0
    while i < len(line):
        c = line[i : i + 1]
        if quoted:
            if c == b'"' and line[i + 1 : i + 2] == b'"':
                i += 1
            elif c == b'"':
                quoted = False
        else:
            if c == b'"' and at_start:
                quoted = True
            at_start = c == b","
        i += 1
    return quoted


def first_line(f: pyarrow.NativeFile) -> bytes:
    """The first line of an open file, its newline included, read a block at a time."""
    line = b""
    while chunk := f.read(1 << 16):
        end = chunk.find(b"\n")
        if end >= 0:
            return line + chunk[: end + 1]
        line += chunk
    return line


def read_parquet(
    f: pyarrow.NativeFile,
    path: str,
    columns: list[str],
    row_groups: Iterable[int] | None = None,
    first: int = 1,
) -> Iterator[pd.DataFrame]:
    """Row groups ``row_groups`` (default: all) of a Parquet file, whose first row is
    record ``first``."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataContractError(
            f"{path} is not a readable Parquet file ({exc}): re-export it or remove it"
        ) from None
    offset = first - 1
    groups = range(parquet.num_row_groups) if row_groups is None else list(row_groups)
    if not groups:
        return
    batches = parquet.iter_batches(batch_size=BLOCK_ROWS, columns=columns, row_groups=groups)
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a damaged data page behind an intact footer
            raise DataContractError(
                f"{path} is damaged after row {offset} ({exc}): re-export it or remove it"
            ) from None
        if batch is None:
            return
        frame = batch.to_pandas()
        yield _with_lineage(frame, path, np.arange(offset + 1, offset + 1 + len(frame)))
        offset += len(frame)


def read_csv(
    data: bytes, path: str, columns: list[str], first_line: int = 1
) -> Iterator[pd.DataFrame]:
    """All columns as text; bad lines kept as records with ``_error``. ``data`` starts
    with the header, which is line ``first_line`` of the file (a piece's lines follow
    the file's header)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    data = data.removeprefix(BOM)
    header = csv_header(data, path, columns)
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if lines <= 1:
        return  # a header and no records
    not_utf8: dict[int, str] = {}
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data, not_utf8 = _blank_non_utf8_lines(data)
    invalid: dict[int, str] = {}

    def on_invalid(row: pacsv.InvalidRow) -> str:
        if row.number is None:  # only with threads, which are off
            raise DataContractError(f"{path}: cannot number the lines of this CSV")
        invalid[row.number] = row.text
        return "skip"

    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True
        ),
    )
    good = np.setdiff1d(np.arange(2, lines + 1), np.fromiter(invalid, int, len(invalid)))
    if len(good) != table.num_rows:
        raise DataContractError(
            f"{path}: read {table.num_rows} rows from {len(good)} well-formed lines; "
            f"{QUOTED_LINE_BREAKS}"
        )
    frame = _with_lineage(table.to_pandas(), path, good)
    for number, text in not_utf8.items():
        at = frame.index[frame[ROW] == number]
        frame.loc[at, ERROR] = "unparseable: not UTF-8 text"
        frame.loc[at, TEXT] = _redacted(text)
    broken = pd.DataFrame(
        {
            ROW: np.fromiter(invalid, np.int64, len(invalid)),
            ERROR: [f"unparseable: expected {len(header)} fields" for _ in invalid],
            TEXT: [_redacted(t) for t in invalid.values()],
        }
    )
    records = pd.concat([frame, _unparsed(broken, path, columns)], ignore_index=True)
    records[ROW] += first_line - 1
    yield from _blocks(records)


def _blank_non_utf8_lines(data: bytes) -> tuple[bytes, dict[int, str]]:
    """Lines that are not UTF-8 become empty lines (one all-null record each, so the line
    numbers hold), returned with their text to be marked as unparseable."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    bad: dict[int, str] = {}
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad[i + 1] = line.decode("utf-8", errors="replace")
            lines[i] = b""
    return b"\n".join(lines) + b"\n", bad


def read_jsonl(
    data: bytes, path: str, columns: list[str], first_line: int = 1
) -> Iterator[pd.DataFrame]:
    """One JSON object per line with exactly the contract's fields; else ``_error``.
    ``data`` starts at line ``first_line`` of the file."""
    lines = (data.removeprefix(BOM) if first_line == 1 else data).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    expected = set(columns)
    records, rows, broken = [], [], []
    for number, line in enumerate(lines, start=first_line):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            broken.append((number, "unparseable: not UTF-8 text", line.decode(errors="replace")))
            continue
        try:
            record = json.loads(text)
        except ValueError:
            broken.append((number, "unparseable: not valid JSON", text))
            continue
        if not isinstance(record, dict):
            broken.append((number, "unparseable: not a JSON object", text))
            continue
        if "\\u" in text and not _encodable(record):  # an escaped lone surrogate
            broken.append((number, "unparseable: not UTF-8 text", text))
            continue
        if record.keys() != expected:
            broken.append((number, f"record: {mismatch(record, columns, 'field')}", text))
            continue
        records.append(record)
        rows.append(number)
    frame = _with_lineage(
        pd.DataFrame.from_records(records, columns=columns), path, np.asarray(rows, np.int64)
    )
    unparsed = pd.DataFrame(
        {
            ROW: np.asarray([b[0] for b in broken], np.int64),
            ERROR: [b[1] for b in broken],
            TEXT: [_redacted(b[2]) for b in broken],
        }
    )
    yield from _blocks(pd.concat([frame, _unparsed(unparsed, path, columns)], ignore_index=True))


def _encodable(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def csv_header(data: bytes, path: str, expected: list[str]) -> list[str]:
    """The file's header, checked against the contract's columns. A first line that is not
    that header is refused without being echoed: in a file exported without a header, it
    is a record (cards, emails)."""
    first = data.removeprefix(BOM).split(b"\n", 1)[0]
    try:
        header = next(csv.reader([first.decode("utf-8").rstrip("\r")]))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        raise DataContractError(
            f"{path}: the first line is not a readable CSV header: export the file with a "
            "header row of column names, in UTF-8, with \\n or \\r\\n line endings"
        ) from None
    if not set(header) & set(expected):
        raise DataContractError(
            f"{path}: the first line has none of the contract's columns, so the file has no "
            f"header (its first line is not shown: it may be a record): export it with the "
            f"header row {','.join(expected)}"
        )
    check_columns(header, expected, path)
    return header


def check_columns(found: Iterable[str], expected: list[str], path: str) -> None:
    problem = mismatch(found, expected, "column")
    if problem:
        raise DataContractError(f"{path}: {problem} (fix the file or the workload's contract)")


def _with_lineage(frame: pd.DataFrame, path: str, rows: np.ndarray) -> pd.DataFrame:
    frame[SOURCE] = path
    frame[ROW] = rows.astype(np.int64)
    frame[ERROR] = pd.Series(None, index=frame.index, dtype=object)
    frame[TEXT] = pd.Series(None, index=frame.index, dtype=object)
    return frame


def _unparsed(broken: pd.DataFrame, path: str, columns: list[str]) -> pd.DataFrame:
    for c in columns:
        broken[c] = None
    broken[SOURCE] = path
    return broken


def _redacted(text: str) -> str:
    return redact_fragments(text)[:MAX_TEXT]  # redact first: a cut must not split a card


def _blocks(frame: pd.DataFrame) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), BLOCK_ROWS):
        yield frame.iloc[start : start + BLOCK_ROWS].reset_index(drop=True)
