"""The content hash reads each output file's footer (data.marking.rows_part), not its
rows: each footer must hold the part of the rows its file holds, however the pass cut
them into files and whichever files the uniqueness check rewrote."""

from __future__ import annotations

import functools
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from app.workloads import get_workload
from data import sources
from data.generate import generate_transactions
from data.marking import Output, footer_part, mark_rows, rows_part, write_rows
from data.pipeline import duplicates_moved, rows_digest
from data.readers import read_piece
from data.sources import describe_file, local_source

TRANSACTIONS = get_workload("transactions")


def passed(raw: Path, out_dir: Path, pieces: slice = slice(None)) -> Output:
    """The pass over ``raw``'s one file, piece by piece (as Ray's tasks run it), then
    the uniqueness check."""
    source = local_source(next(raw.iterdir()))
    path = source.paths[0]
    described = describe_file(source, path, TRANSACTIONS)
    columns = list(TRANSACTIONS.contract().columns)
    mark = functools.partial(
        mark_rows, workload_name=TRANSACTIONS.name, fractions=(0.8, 0.1, 0.1), seed=0,
        pii_secret=b"k" * 32, sha256_of={path: described.sha256},
    )  # fmt: skip
    out = Output(out_dir / "rows", out_dir / "ids", TRANSACTIONS.id_column, 2)
    for piece in described.pieces[pieces]:
        write_rows((mark(b) for b in read_piece(source.filesystem, piece, columns)), out)
    assert duplicates_moved(out, TRANSACTIONS, [described.sha256]) > 0  # files rewritten
    return out


def test_each_footer_holds_the_part_of_the_rows_its_file_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "PIECE_BYTES", 32 << 10)  # several files a split
    generate_transactions(
        tmp_path / "raw", rows=3000, seed=3, fault_rate=0.05, fmt="csv", rows_per_shard=3000
    )
    out = passed(tmp_path / "raw", tmp_path / "whole")
    assert len(list((out.rows / "split=train").glob("*.parquet"))) >= 4
    # Every file's footer holds the part of the rows it holds now: those the pass
    # wrote, less those the uniqueness check moved out; duplicates.parquet too.
    files = sorted(out.rows.rglob("*.parquet"))
    assert any(f.name == "duplicates.parquet" for f in files)
    for f in files:
        assert footer_part(f).tolist() == rows_part(pq.read_table(f)).tolist(), f
    # Rows left out: another hash.
    fewer = passed(tmp_path / "raw", tmp_path / "fewer", slice(1, None))
    assert rows_digest(fewer.rows) != rows_digest(out.rows)
