"""Corrupted raw files against the readers the ingest runs (data/sources.describe_file,
which cuts a file into pieces, then data/readers.read_piece, which Ray Data's RawFiles
calls per piece; the pieces here are 1 KiB, so a corruption often sits across a cut or
in a piece of its own): truncation,
bit flips, another encoding, a BOM in the middle, NUL bytes, a huge line, 10,000
columns. Every file is refused with a DataContractError that names it, or it
reconciles: the records read (parsed or kept with why not) are the records counted.
Nothing else may come out: no other exception, no record lost or made up.

Seeded, so a failure reproduces: each case id holds its format, corruption and seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from app.errors import DataContractError
from app.workloads import get_workload
from data import sources
from data.generate import generate_transactions
from data.readers import read_piece
from data.sources import describe_file, local_source

TRANSACTIONS = get_workload("transactions")
COLUMNS = list(TRANSACTIONS.contract().columns)
CASES_PER_KIND = 12


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def other_encoding(data: bytes, rng: random.Random) -> bytes:
    text = data.decode("utf-8", errors="replace") + "café,naïve\n"
    return text.encode(rng.choice(["utf-16", "latin-1", "cp1252"]), errors="replace")


def bom_inside(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(1, len(data))
    return data[:at] + b"\xef\xbb\xbf" + data[at:]


def nul_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        out.insert(rng.randrange(len(out)), 0)
    return bytes(out)


def huge_line(data: bytes, rng: random.Random) -> bytes:
    lines = data.split(b"\n")
    lines.insert(rng.randrange(1, len(lines)), b"x" * rng.randrange(1 << 20, 1 << 21))
    return b"\n".join(lines)


def many_columns(data: bytes, rng: random.Random) -> bytes:
    """10,000 more columns: in a CSV's header, or as keys of one JSON line."""
    names = [f"c{i}" for i in range(10_000)]
    lines = data.split(b"\n")
    if data.startswith(b"{"):
        at = rng.randrange(len(lines) - 1)
        keys = "".join(f'"{n}": 1, ' for n in names).encode()
        lines[at] = b"{" + keys + lines[at][1:]
    else:
        lines[0] += b"," + ",".join(names).encode()
    return b"\n".join(lines)


CORRUPTIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncated": truncate,
    "bit flips": flip_bits,
    "other encoding": other_encoding,
    "BOM inside": bom_inside,
    "NUL bytes": nul_bytes,
    "huge line": huge_line,
    "10,000 columns": many_columns,
}
TEXT_ONLY = {"other encoding", "BOM inside", "huge line", "10,000 columns"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One clean file of 60 transactions per format, as bytes."""
    out = {}
    for fmt in ("csv", "jsonl", "parquet"):
        folder = tmp_path_factory.mktemp(fmt)
        report = generate_transactions(folder, rows=60, seed=5, fmt=fmt)
        out[fmt] = report.files[0].read_bytes()
    return out


def cases() -> list[tuple[str, str, int]]:
    return [
        (fmt, kind, seed)
        for fmt in ("csv", "jsonl", "parquet")
        for kind in CORRUPTIONS
        if fmt != "parquet" or kind not in TEXT_ONLY
        for seed in range(CASES_PER_KIND)
    ]


# Not a speed target: a bound on a hang. A case takes under a second; before the
# redaction patterns were made linear, a 1 MB line of letters ran for minutes.
@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fmt", "kind", "seed"), cases())
def test_a_corrupted_file_is_refused_by_name_or_reconciles(
    clean: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    kind: str,
    seed: int,
) -> None:
    monkeypatch.setattr(sources, "PIECE_BYTES", 1024)
    data = CORRUPTIONS[kind](clean[fmt], random.Random(seed))
    path = tmp_path / f"corrupt-{seed}.{fmt}"
    path.write_bytes(data)
    source = local_source(path)
    try:
        described = describe_file(source, source.paths[0], TRANSACTIONS)
        counted = described.records
        read = sum(
            len(block)
            for piece in described.pieces
            for block in read_piece(source.filesystem, piece, COLUMNS)
        )
    except DataContractError as exc:
        assert path.name in str(exc), str(exc)
        return
    assert read == counted, f"{kind}: {counted} records counted, {read} read"
