"""Reading raw files for Ray Data: Parquet, CSV and JSON lines, with nothing dropped.

:class:`RawFiles` is a Ray Data datasource. Every block it yields holds the file's
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
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from ray.data.datasource import FileBasedDatasource

from app.errors import DataContractError
from data.pii import redact_fragments
from data.validate import mismatch

if TYPE_CHECKING:
    import pyarrow

SOURCE = "_source"
ROW = "_row"
ERROR = "_error"
TEXT = "_text"
EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
BLOCK_ROWS = 65_536
BOM = b"\xef\xbb\xbf"  # Excel's UTF-8 exports start with one
MAX_TEXT = 500  # characters of an unparseable line kept (redacted) in the quarantine


def file_format(path: str) -> str | None:
    return EXTENSIONS.get(PurePosixPath(path).suffix.lower())


class RawFiles(FileBasedDatasource):
    """Raw files of one workload; ``columns`` are the contract's columns."""

    _FILE_EXTENSIONS = [ext.lstrip(".") for ext in EXTENSIONS]

    def __init__(self, paths: list[str], *, columns: list[str], **kwargs) -> None:  # noqa: ANN003
        super().__init__(paths, **kwargs)
        self.columns = columns

    def _open_input_source(self, filesystem, path, **open_args):  # noqa: ANN001, ANN202
        if file_format(path) == "parquet":  # Parquet needs random access to its footer
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pyarrow.NativeFile, path: str) -> Iterator[pd.DataFrame]:
        return read_stream(f, path, self.columns)


def read_stream(f: pyarrow.NativeFile, path: str, columns: list[str]) -> Iterator[pd.DataFrame]:
    """The blocks of one open file (random access for Parquet), by its extension."""
    kind = file_format(path)
    if kind == "parquet":
        return read_parquet(f, path, columns)
    if kind == "csv":
        return read_csv(f.readall(), path, columns)
    if kind == "jsonl":
        return read_jsonl(f.readall(), path, columns)
    raise DataContractError(f"{path}: unsupported file type; use .parquet, .csv or .jsonl")


def read_parquet(f: pyarrow.NativeFile, path: str, columns: list[str]) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataContractError(
            f"{path} is not a readable Parquet file ({exc}): re-export it or remove it"
        ) from None
    offset = 0
    batches = parquet.iter_batches(batch_size=BLOCK_ROWS, columns=columns)
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


def read_csv(data: bytes, path: str, columns: list[str]) -> Iterator[pd.DataFrame]:
    """All columns as text; bad lines kept as records with ``_error``."""
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
            f"{path}: read {table.num_rows} rows from {len(good)} well-formed lines; quoted "
            "values with line breaks are not supported: re-export without them"
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
    yield from _blocks(pd.concat([frame, _unparsed(broken, path, columns)], ignore_index=True))


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


def read_jsonl(data: bytes, path: str, columns: list[str]) -> Iterator[pd.DataFrame]:
    """One JSON object per line with exactly the contract's fields; else ``_error``."""
    lines = data.removeprefix(BOM).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    expected = set(columns)
    records, rows, broken = [], [], []
    for number, line in enumerate(lines, start=1):
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
