"""Shards on disk: rows with their faults written as Parquet, CSV or JSONL files.

Shard ``i`` depends only on the arguments and ``i``, never on other shards, so shards could
be written in parallel; memory stays bounded by one shard.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.generate.faults import CODE, FAULTS, ROW_FAULTS, Shard, inject
from data.generate.rows import (
    COLUMNS,
    DAYS,
    FAULT_STREAM,
    SCHEMA,
    START_S,
    TRUNC_STREAM,
    TS_START,
    check_common,
    clean_table,
    is_int,
    is_real,
    rng_for,
)

FORMATS = ("parquet", "csv", "jsonl")


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _amount_text(shard: Shard, bad: pa.Array) -> pa.Array:
    """The amounts as decimal text ("12.34"), the `types` rows' replaced by ``bad``."""
    text = pc.cast(shard.cols["amount"], pa.string())
    return pc.replace_with_mask(text, pa.array(shard.kind == CODE["types"]), bad)


# --- Parquet ----------------------------------------------------------------------------


def _parquet_bytes(shard: Shard) -> bytes:
    table = pa.table(shard.cols, schema=SCHEMA)
    if shard.bad_amount is not None:
        # A Parquet column has one type per file: a shard with any `types` fault stores
        # `amount` as strings, the valid amounts as their decimal text ("12.34").
        amount = _amount_text(shard, shard.bad_amount)
        table = table.set_column(COLUMNS.index("amount"), "amount", amount)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# --- CSV and JSONL ----------------------------------------------------------------------


@functools.cache
def _clock() -> pa.Array:
    """The text of every second of a day, as HH:MM:SSZ."""
    return pa.array([f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86_400)])


@functools.cache
def _dates() -> pa.Array:
    return pa.array([f"{(TS_START + pd.Timedelta(days=d)):%Y-%m-%d}T" for d in range(DAYS)])


def _ts_text(ts: pa.Array) -> pa.Array:
    """ISO-8601 text (2026-03-01T12:34:56Z) by table lookup: 2-3x faster than strftime."""
    offset = pc.subtract(pc.divide(pc.cast(ts, pa.int64()), 1_000_000), START_S)
    return _join(
        _dates().take(pc.divide(offset, 86_400)), _clock().take(pc.remainder(offset, 86_400))
    )


def _csv_quote(text: pa.Array) -> pa.Array:
    """RFC 4180 quoting where needed: only values with a comma, quote or line break.

    (pyarrow's writer quotes every string, header included: other bytes.)
    """
    needs = pc.match_substring_regex(text, '[,"\r\n]')
    quoted = _join('"', pc.replace_substring(text, '"', '""'), '"')
    return pc.if_else(needs, quoted, text)


def _json_quote(text: pa.Array) -> pa.Array:
    return _join('"', text, '"')


def _json_escape(text: pa.Array) -> pa.Array:
    return _json_quote(pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"'))


def _fields(shard: Shard, fmt: str) -> list[pa.Array]:
    """Each column's text per row, in COLUMNS order, as written between the separators.

    CSV: "" for null, quoted where needed. JSON: a value, null for null. Only `note` and
    the `types` strings are free text; the other string columns come from fixed alphabets
    (letters, digits, . _ @ : - and spaces) that need no CSV quoting and no JSON escaping.
    """
    t = shard.cols
    csv = fmt == "csv"
    free_text = _csv_quote if csv else _json_escape
    fixed_text = (lambda v: v) if csv else _json_quote
    amount = pc.cast(t["amount"], pa.string())
    if shard.bad_amount is not None:
        amount = _amount_text(shard, free_text(shard.bad_amount))
    values = [
        pc.cast(t["txn_id"], pa.string()),
        fixed_text(_ts_text(t["ts"])),
        amount,
        *(fixed_text(t[c]) for c in COLUMNS[3:10]),
        free_text(t["note"]),
        pc.cast(t["is_fraud"], pa.string()),
    ]
    return [pc.fill_null(v, "" if csv else "null") for v in values]


def _malformed_lines(shard: Shard, fields: list[pa.Array], fmt: str) -> list[str]:
    """The garbage line (no newline) written for each row with a `malformed` fault."""
    rows = np.flatnonzero(shard.kind == CODE["malformed"])
    columns = [values.take(rows).to_pylist() for values in fields]
    lines = []
    for row, values in zip(rows, zip(*columns, strict=True), strict=True):
        u, v = shard.aux[row]
        if fmt == "jsonl":  # cut in the middle: a JSON object without its closing brace
            line = "{" + ",".join(f'"{c}":{x}' for c, x in zip(COLUMNS, values, strict=True))
            line += "}"
            lines.append(line[: len(line) // 3 + int(v * (len(line) // 3))])
        elif u < 1 / 3:  # a field cut out: 11 fields
            drop = 1 + int(v * (len(values) - 1))
            lines.append(",".join(values[:drop] + values[drop + 1 :]))
        elif u < 2 / 3:  # the record as a ';'-separated blob: 1 field
            lines.append(";".join(x for x in values if "," not in x and '"' not in x))
        else:  # a stray ';'-separated blob after the record: 13 fields
            lines.append(",".join(values) + "," + ";".join(values[3:7]))
    return lines


def _text_bytes(shard: Shard, fmt: str) -> tuple[bytes, np.ndarray]:
    """The shard as CSV or JSONL bytes and the byte offset where each record's line starts."""
    fields = _fields(shard, fmt)
    if fmt == "csv":
        header = ",".join(COLUMNS) + "\n"
        separators = ["", *[","] * (len(COLUMNS) - 1), "\n"]
    else:
        header = ""
        separators = [f'{"," if i else "{"}"{c}":' for i, c in enumerate(COLUMNS)] + ["}\n"]
    # One join per shard, the separators (JSON's with the keys) as literals between the
    # fields. Large strings: a shard's text may pass 2 GiB.
    large = pa.large_string()
    pieces = [pa.scalar(separators[0], large)]
    for values, separator in zip(fields, separators[1:], strict=True):
        pieces += [values.cast(large), pa.scalar(separator, large)]
    lines = pc.binary_join_element_wise(*pieces, pa.scalar("", large))
    bad = _malformed_lines(shard, fields, fmt)
    if bad:
        malformed = pa.array(shard.kind == CODE["malformed"])
        lines = pc.replace_with_mask(lines, malformed, pa.array([b + "\n" for b in bad], large))
    _, offsets, data = lines.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    body = bytes(memoryview(data)[offsets[0] : offsets[-1]])
    return header.encode() + body, len(header) + offsets[:-1] - offsets[0]


def text_cut(data: bytes, starts: np.ndarray, csv: bool, rng: np.random.Generator) -> int:
    """A byte in the last third where cutting leaves a partial, broken last line.

    The line to cut is one that starts in the last third (or the one holding its first
    byte). The cut keeps at least one byte of that line and drops at least one before its
    newline. In CSV it is also outside any quoted field and before the line's 11th separator,
    so the partial line parses as fewer than 12 fields (never as a whole record, never as an
    unterminated quote). In JSONL any proper prefix of an object is invalid JSON.
    """
    lo = -(-2 * len(data) // 3)
    later = np.flatnonzero(starts >= lo)
    if later.size:
        line = int(later[rng.integers(0, later.size)])
    else:
        line = max(int(np.searchsorted(starts, lo, side="right")) - 1, 0)
    begin = int(starts[line])
    end = int(starts[line + 1]) - 1 if line + 1 < starts.size else len(data) - 1  # its "\n"
    seg = np.frombuffer(data, dtype=np.uint8)[begin:end]
    ok = np.arange(seg.size) >= 1  # keep data[:begin + k]: at least one byte of the line
    if csv:
        quote = seg == 34
        outside = (np.cumsum(quote) - quote) % 2 == 0  # an even number of quotes before
        comma = (seg == 44) & outside
        ok &= outside & (np.cumsum(comma) - comma <= 10)
    inside = ok & (begin + np.arange(seg.size) >= lo)
    candidates = np.flatnonzero(inside if inside.any() else ok)
    return begin + int(candidates[rng.integers(0, candidates.size)])


def _shard_file(
    shard: Shard, fmt: str, cut: np.random.Generator | None
) -> tuple[bytes, int, np.ndarray]:
    """The shard's file, the records it holds and their FAULTS codes (-1: clean).

    With ``cut``, the file is truncated inside its last third: a Parquet file then holds no
    readable record; a CSV/JSONL file ends in a partial line, itself a `truncated` record.
    """
    if fmt == "parquet":
        data = _parquet_bytes(shard)
        if cut is None:
            return data, shard.kind.size, shard.kind
        at = cut.integers(-(-2 * len(data) // 3), len(data))
        return data[:at], 0, np.array([CODE["truncated"]])
    data, starts = _text_bytes(shard, fmt)
    if cut is None:
        return data, shard.kind.size, shard.kind
    at = text_cut(data, starts, fmt == "csv", cut)
    partial = int(np.searchsorted(starts, at, side="right")) - 1  # the line that is cut
    kind = np.append(shard.kind[:partial], CODE["truncated"])
    return data[:at], kind.size, kind


# --- the generator ----------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateReport:
    """What :func:`generate_transactions` wrote."""

    files: list[Path]  # the shards, sorted
    rows: int  # records present in the files (after truncation)
    injected: dict[str, int]  # fault kind -> rows (or files) carrying it; only kinds injected
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def generate_transactions(
    out_dir: Path,
    *,
    rows: int,
    seed: int = 0,
    fault_rate: float = 0.0,
    faults: Sequence[str] = FAULTS,
    drift: float = 0.0,
    fmt: str = "parquet",
    rows_per_shard: int = 250_000,
) -> GenerateReport:
    """Write ``rows`` transactions as ``transactions-NNNNN.<fmt>`` shards into ``out_dir``.

    Each row independently carries one row-level fault with probability ``fault_rate``, its
    kind uniform over the kinds of ``faults`` that apply to ``fmt`` (`malformed` needs CSV or
    JSONL). Every faulty row breaks exactly one contract rule; the others stay clean.
    `truncated` (with ``fault_rate > 0``) cuts the last shard inside its last third:

    * CSV/JSONL: mid-line, so the last line is a partial record, counted once as
      ``injected["truncated"]`` and in ``rows``; the lines after the cut are gone (not in
      ``rows``, and their faults not in ``injected``).
    * Parquet: the file is no longer readable; ``injected["truncated"] == 1`` (one broken
      file), and neither ``rows`` nor ``injected`` counts that shard's rows.

    So for CSV/JSONL, ``rows`` is the number of non-header lines and the rows breaking the
    contract number ``sum(injected.values())``.
    """
    check_common(rows=rows, seed=seed, drift=drift)
    if not is_real(fault_rate) or not 0.0 <= fault_rate <= 1.0:
        raise ValueError(f"fault_rate must be a number in [0, 1], got {fault_rate!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if isinstance(faults, str):
        raise ValueError(f"faults must be a sequence of kinds such as ({faults!r},), not a str")
    faults = tuple(faults)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}: pass a subset of {FAULTS}")
    if not is_int(rows_per_shard, 1):
        raise ValueError(f"rows_per_shard must be an int >= 1, got {rows_per_shard!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: pass a folder (new or empty of shards)")
    existing = sorted(p.name for f in FORMATS for p in out_dir.glob(f"transactions-*.{f}"))
    if existing:
        raise ValueError(
            f"{out_dir} already holds transaction shards ({existing[0]}, ...): "
            "pass a new or empty folder"
        )

    began = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, seed, rows_per_shard, rate = int(rows), int(seed), int(rows_per_shard), float(fault_rate)
    kinds = tuple(k for k in ROW_FAULTS if k in faults and (k, fmt) != ("malformed", "parquet"))
    shards = math.ceil(rows / rows_per_shard)
    files: list[Path] = []
    present = 0
    counts = np.zeros(len(FAULTS), dtype=np.int64)
    for i in range(shards):
        start = i * rows_per_shard
        table = clean_table(min(rows_per_shard, rows - start), seed, float(drift), start)
        shard = inject(table, rng_for(FAULT_STREAM, seed, start), rate, kinds)
        last = i == shards - 1 and "truncated" in faults and rate > 0
        data, records, kind = _shard_file(
            shard, fmt, rng_for(TRUNC_STREAM, seed, start) if last else None
        )
        files.append(out_dir / f"transactions-{i:05d}.{fmt}")
        files[-1].write_bytes(data)
        present += records
        counts += np.bincount(kind[kind >= 0], minlength=len(FAULTS))
    injected = {k: int(c) for k, c in zip(FAULTS, counts, strict=True) if c}
    return GenerateReport(sorted(files), present, injected, time.perf_counter() - began)
