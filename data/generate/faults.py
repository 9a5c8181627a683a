"""Row-level faults: some clean rows are made to break exactly one contract rule each.

``malformed`` lines and the ``truncated`` file are faults of the written bytes; they are
drawn here (which rows, and the shape of each line) and applied in
:mod:`data.generate.files`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.generate.rows import COLUMNS, MAX_AMOUNT

FAULTS = ("nulls", "range", "types", "categories", "duplicates", "malformed", "truncated")
ROW_FAULTS = tuple(f for f in FAULTS if f != "truncated")
CODE = {kind: code for code, kind in enumerate(FAULTS)}
# Columns a `nulls` fault may empty: every required one but the id and the label.
_NULLABLE_TARGETS = (
    "amount", "currency", "merchant_category", "device", "country",
    "card_number", "email", "ip_address", "ts",
)  # fmt: skip
# Not numbers in any reader's default parsing (no "NaN", "N/A", "inf", ...).
_BAD_AMOUNTS = ("12,5O", "abc", "1.2.3", "twelve", "$12.50", "12..5", "O.99", "--5", "1e")
_BAD_CATEGORIES = ("crypto_atm", "pawn_shop", "wire_transfer", "adult", "lottery_kiosk")
_BAD_DEVICES = ("smartwatch", "kiosk", "smart_tv", "iot_fridge")


@dataclass
class Shard:
    """One shard's rows after row-level faults, before it is written."""

    cols: dict[str, pa.Array]  # nulls, range, categories and duplicates applied
    kind: np.ndarray  # per row: the FAULTS code of its fault, -1 when clean
    bad_amount: pa.Array | None  # `types` rows' amount text, in row order
    aux: np.ndarray  # per row uniform draws in [0, 1) that shape `malformed` lines


def inject(table: pa.Table, rng: np.random.Generator, rate: float, kinds: tuple[str, ...]) -> Shard:
    """Give each row, with probability ``rate``, one fault of a kind drawn from ``kinds``."""
    n = table.num_rows
    cols = {name: table.column(name).combine_chunks() for name in COLUMNS}
    kind = np.full(n, -1, dtype=np.int64)
    if rate <= 0 or not kinds:
        return Shard(cols, kind, None, np.zeros((0, 2)))
    faulty = rng.random(n) < rate
    codes = np.array([CODE[k] for k in kinds])
    kind = np.where(faulty, codes[rng.integers(0, len(codes), n)], -1)
    aux = rng.random((n, 2))

    def replace(name: str, mask: np.ndarray, values: pa.Array) -> None:
        if mask.any():
            cols[name] = pc.replace_with_mask(cols[name], pa.array(mask), values)

    def only(rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        return mask

    # duplicates: the txn_id of an earlier clean row of this shard; none earlier -> clean.
    dup = np.flatnonzero(kind == CODE["duplicates"])
    if dup.size:
        clean = np.flatnonzero(kind == -1)
        before = np.searchsorted(clean, dup)
        kind[dup[before == 0]] = -1
        dup, before = dup[before > 0], before[before > 0]
        ids = cols["txn_id"].to_numpy().copy()
        ids[dup] = ids[clean[(aux[dup, 0] * before).astype(np.int64)]]
        cols["txn_id"] = pa.array(ids)

    # range: the amount negated, zero, or over the cap. Before `nulls`: no nulls to lose.
    rows = np.flatnonzero(kind == CODE["range"])
    if rows.size:
        amount = cols["amount"].to_numpy().copy()
        variant = (aux[rows, 0] * 3).astype(np.int64)
        too_big = np.round(MAX_AMOUNT + 0.01 + aux[rows, 1] * 100_000.0, 2)
        amount[rows] = np.select([variant == 0, variant == 1], [-amount[rows], 0.0], too_big)
        cols["amount"] = pa.array(amount)

    rows = np.flatnonzero(kind == CODE["nulls"])
    target = (aux[rows, 0] * len(_NULLABLE_TARGETS)).astype(np.int64)
    for i, name in enumerate(_NULLABLE_TARGETS):
        mask = only(rows[target == i])
        replace(name, mask, pa.nulls(int(mask.sum()), cols[name].type))

    # types: the amount written as text that is no number; see `files.amount_text`.
    bad_amount = None
    rows = np.flatnonzero(kind == CODE["types"])
    if rows.size:
        bad_amount = pa.array(_BAD_AMOUNTS).take((aux[rows, 0] * len(_BAD_AMOUNTS)).astype(int))

    # categories: half an unknown merchant category, half an unknown device.
    rows = np.flatnonzero(kind == CODE["categories"])
    for name, bad, share in (
        ("merchant_category", _BAD_CATEGORIES, aux[rows, 0] < 0.5),
        ("device", _BAD_DEVICES, aux[rows, 0] >= 0.5),
    ):
        mask = only(rows[share])
        replace(name, mask, pa.array(bad).take((aux[mask, 1] * len(bad)).astype(np.int64)))

    return Shard(cols, kind, bad_amount, aux)
