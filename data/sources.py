"""Where raw rows come from: the workload's built-in set, or files under any URI.

A source is a file or a folder, named by a local path or by any URI pyarrow has a
filesystem for (``s3://bucket/raw/``, ``gs://…``, ``hdfs://…``; credentials come from
the usual environment of that store). Each file is described before the run: its size,
its SHA-256 (the dataset version id is made of these) and how many records it holds,
counted independently of the parser, so the run can be reconciled against it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from app.errors import ConfigError, DataContractError
from app.workloads import Workload
from data.readers import (
    EXTENSIONS,
    PIECE_BYTES,
    PIECE_ROWS,
    Piece,
    check_columns,
    csv_header,
    file_format,
    read_piece,
)

if TYPE_CHECKING:
    import pyarrow.fs

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RawSource:
    """The files of one source and the filesystem they live on."""

    uri: str
    filesystem: pyarrow.fs.FileSystem
    paths: list[str]  # as the filesystem names them, sorted


def builtin_raw_file(workload: Workload, raw_dir: Path) -> Path:
    """Write the workload's shipped data set as a raw Parquet file (once) and return it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = raw_dir / workload.name / f"{workload.name}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pandas(workload.builtin_source(), preserve_index=False), tmp)
        tmp.replace(path)
    return path


def open_source(uri: str | Path) -> RawSource:
    """The raw files under ``uri`` (a file or a folder, searched recursively)."""
    import pyarrow.fs as pafs

    text = str(uri)
    try:
        if "://" in text:
            filesystem, root = pafs.FileSystem.from_uri(text)
        else:
            filesystem, root = pafs.LocalFileSystem(), str(Path(text).resolve())
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            paths = [root]
        elif info.type == pafs.FileType.Directory:
            listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            paths = sorted(
                i.path
                for i in listing
                if i.type == pafs.FileType.File and file_format(i.path) is not None
            )
        else:
            raise ConfigError(f"source {text} does not exist: pass a file or a folder of them")
    except (OSError, ValueError) as exc:  # unknown scheme, no credentials, unreachable store
        raise ConfigError(f"cannot open source {text}: {exc}") from None
    if not paths:
        raise ConfigError(
            f"source {text} holds no {', '.join(sorted(EXTENSIONS))} files: point --source at "
            "raw data"
        )
    unsupported = [p for p in paths if file_format(p) is None]
    if unsupported:
        raise ConfigError(f"{unsupported[0]} is not a supported file: use .parquet, .csv or .jsonl")
    return RawSource(text, filesystem, paths)


def local_source(path: Path) -> RawSource:
    import pyarrow.fs as pafs

    return RawSource(str(path), pafs.LocalFileSystem(), [str(path.resolve())])


class Described(NamedTuple):
    size: int
    sha256: str
    records: int
    pieces: list[Piece]  # what the read tasks read, in order


def describe_file(source: RawSource, path: str, workload: Workload) -> Described:
    """One raw file, checked, hashed, counted and cut into pieces, in one read.

    Records: Parquet's row count from its footer; for CSV the physical lines after the
    header, for JSON lines every physical line. Pieces: about ``PIECE_BYTES`` of whole
    lines each (the first line of a CSV, its header, belongs to the first), or about
    ``PIECE_ROWS`` rows of whole row groups. An unreadable or empty file, or one with a
    missing or extra column, is refused here, naming the file, before anything runs.
    """
    kind = file_format(path)
    expected = list(workload.contract().columns)
    digest, size, newlines, first, last = hashlib.sha256(), 0, 0, b"", b"\n"
    cuts = [(0, 1)]  # (byte offset, line number) where each piece starts
    with source.filesystem.open_input_stream(path) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            # The first line break at or after PIECE_BYTES past the last cut ends a piece.
            at = max(cuts[-1][0] + PIECE_BYTES - size, 0)
            while at < len(chunk) and (end := chunk.find(b"\n", at)) >= 0:
                cuts.append((size + end + 1, newlines + chunk.count(b"\n", 0, end + 1) + 1))
                at = end + 1 + PIECE_BYTES
            size += len(chunk)
            newlines += chunk.count(b"\n")
            if not first:
                first = chunk[: 1 << 16]
            last = chunk[-1:]
    if size == 0:
        raise DataContractError(
            f"{path} is empty (0 bytes): remove it from the source or re-export it"
        )
    lines = newlines + (last != b"\n")
    if kind == "parquet":
        records, pieces = _parquet_pieces(source, path, expected)
    else:
        if kind == "csv":
            csv_header(first, path, expected)
        records = lines - (kind == "csv")
        ends = [start for start, _ in cuts[1:] if start < size] + [size]
        pieces = [
            Piece(path, start, stop, line) for (start, line), stop in zip(cuts, ends, strict=False)
        ]
        if kind == "csv":  # a CSV's records start on line 2
            pieces[0] = Piece(path, 0, pieces[0].stop, 2)
    return Described(size, digest.hexdigest(), records, pieces)


def file_digest(source: RawSource, path: str) -> tuple[int, str]:
    """(size, sha256) of one raw file, whatever it holds."""
    digest, size = hashlib.sha256(), 0
    with source.filesystem.open_input_stream(path) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def read_through(source: RawSource, pieces: list[Piece], columns: list[str]) -> None:
    """Read one file to its end with the pass's own reader, keeping nothing: what the
    reader refuses (a damaged Parquet page, a CSV it cannot line up) raises here, naming
    the file, instead of in the middle of the pass."""
    for piece in pieces:
        for _ in read_piece(source.filesystem, piece, columns):
            pass


def _parquet_pieces(source: RawSource, path: str, expected: list[str]) -> tuple[int, list[Piece]]:
    """A Parquet file's rows (from its footer), and its row groups cut into pieces."""
    import pyarrow.parquet as pq

    try:
        with source.filesystem.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
            names, rows = meta.schema.to_arrow_schema().names, meta.num_rows
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataContractError(
            f"{path} is not a readable Parquet file ({exc}): re-export it or remove it from "
            "the source"
        ) from None
    check_columns(names, expected, path)
    pieces, start, first, held = [], 0, 1, 0  # held: rows of groups [start, group)
    for group in range(len(sizes) + 1):
        if group == len(sizes) or (held and held + sizes[group] > PIECE_ROWS):
            pieces.append(Piece(path, start, group, first))
            start, first, held = group, first + held, 0
        if group < len(sizes):
            held += sizes[group]
    return rows, pieces
