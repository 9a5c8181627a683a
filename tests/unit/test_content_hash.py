"""The content hash reads each output file's footer (data.marking.rows_part), not its
rows: it must stay the hash of the rows the files hold, however the pass cut them into
files and whichever files the uniqueness check rewrote."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from app.workloads import get_workload
from data import sources
from data.generate import generate_transactions
from data.marking import Output, mark_rows, write_rows
from data.pipeline import duplicates_moved, rows_digest
from data.readers import read_piece
from data.sources import describe_file, local_source

TRANSACTIONS = get_workload("transactions")


def hash_of_rows(rows_dir: Path) -> str:
    """The content hash from the rows themselves (every file read): what the footers
    must add up to."""
    digest = hashlib.sha256()
    keys = ("scaledl-rows-a01", "scaledl-rows-b02")
    for partition in sorted(p for p in rows_dir.iterdir() if p.is_dir()):
        names, rows, sums = None, 0, np.zeros(2, np.uint64)
        for f in sorted(partition.glob("*.parquet")):
            frame = pq.read_table(f).to_pandas()
            names = names or list(frame.columns)
            rows += len(frame)
            sums += np.array(
                [
                    pd.util.hash_pandas_object(frame[names], index=False, hash_key=k)
                    .to_numpy()
                    .sum(dtype=np.uint64)
                    for k in keys
                ],
                np.uint64,
            )
        digest.update(f"{partition.name}\n{names}\n{rows}\n".encode() + sums.tobytes())
    return digest.hexdigest()[:12]


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


def test_the_hash_from_the_footers_is_the_hash_of_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "PIECE_BYTES", 32 << 10)  # several files a split
    generate_transactions(
        tmp_path / "raw", rows=3000, seed=3, fault_rate=0.05, fmt="csv", rows_per_shard=3000
    )
    out = passed(tmp_path / "raw", tmp_path / "whole")
    assert len(list((out.rows / "split=train").glob("*.parquet"))) >= 4
    assert rows_digest(out.rows) == hash_of_rows(out.rows)
    # Rows left out: another hash, still the one of what the files hold.
    fewer = passed(tmp_path / "raw", tmp_path / "fewer", slice(1, None))
    assert rows_digest(fewer.rows) == hash_of_rows(fewer.rows) != rows_digest(out.rows)
