"""Seeded generator of raw card transactions for the ``transactions`` workload.

Writes realistic Parquet, CSV or JSONL shards, optionally with faults of known kinds and
exact counts, to exercise the ingest pipeline (validation, pseudonymization, sharded
reads) at scale. Shard ``i`` depends only on the arguments and ``i``, never on other
shards, so shards could be written in parallel; memory stays bounded by one shard.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMATS = ("parquet", "csv", "jsonl")
FAULTS = ("nulls", "range", "types", "categories", "duplicates", "malformed", "truncated")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CAD", "AUD")
MERCHANT_CATEGORIES = (
    "grocery",
    "restaurants",
    "fuel",
    "utilities",
    "pharmacy",
    "clothing",
    "entertainment",
    "online_retail",
    "travel",
    "electronics",
    "jewelry",
    "gambling",
)
DEVICES = ("mobile", "desktop", "tablet", "pos", "atm")
COUNTRIES = (
    "US", "GB", "DE", "FR", "ES", "IT", "NL", "CA", "AU", "JP",
    "BR", "MX", "IN", "PL", "SE", "IE", "PT", "NG", "RU", "CN",
)  # fmt: skip
COLUMNS = (
    "txn_id",
    "ts",
    "amount",
    "currency",
    "merchant_category",
    "country",
    "device",
    "card_number",
    "email",
    "ip_address",
    "note",
    "is_fraud",
)

MAX_AMOUNT = 50_000.0
TS_START = pd.Timestamp("2026-01-01T00:00:00Z")  # inclusive
TS_END = pd.Timestamp("2026-07-01T00:00:00Z")  # exclusive: the last second is 2026-06-30 23:59:59
_START_S = int(TS_START.timestamp())
_DAYS = (TS_END - TS_START).days  # 181

SCHEMA = pa.schema(
    [
        ("txn_id", pa.int64()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("amount", pa.float64()),
        ("currency", pa.string()),
        ("merchant_category", pa.string()),
        ("country", pa.string()),
        ("device", pa.string()),
        ("card_number", pa.string()),
        ("email", pa.string()),
        ("ip_address", pa.string()),
        ("note", pa.string()),
        ("is_fraud", pa.int64()),
    ]
)

# --- distributions ------------------------------------------------------------------------

_COUNTRY_P = np.array(
    [.30, .12, .09, .07, .04, .04, .03, .05, .04, .04,
     .03, .025, .03, .02, .015, .015, .01, .01, .01, .015]
)  # fmt: skip
_COUNTRY_P /= _COUNTRY_P.sum()
# The local currency of each country; where it is not one of CURRENCIES, the card pays in USD
# (BR, MX, IN, NG, RU, CN) or EUR (PL, SE), as a traveller's or a foreign merchant's would.
_COUNTRY_CURRENCY = np.array(
    [CURRENCIES.index(c) for c in
     ["USD", "GBP", "EUR", "EUR", "EUR", "EUR", "EUR", "CAD", "AUD", "JPY",
      "USD", "USD", "USD", "EUR", "EUR", "EUR", "EUR", "USD", "USD", "USD"]]
)  # fmt: skip
# Units of each currency per USD. JPY is scaled x20, not by its market rate, so that yen
# amounts are larger but stay within the contract's 50 000 cap.
_FX = np.array([1.0, 0.92, 0.79, 20.0, 1.36, 1.52])

_CATEGORY_P = np.array([0.20, 0.16, 0.09, 0.06, 0.06, 0.08, 0.07, 0.12, 0.05, 0.05, 0.02, 0.04])
# Median amount of each category relative to the base median.
_CATEGORY_SCALE = np.array([1.0, 0.8, 1.1, 2.2, 0.6, 1.5, 0.9, 1.2, 6.0, 4.0, 7.0, 1.8])
_DEVICE_P = np.array([0.42, 0.18, 0.07, 0.28, 0.05])
# Relative frequency of each hour of day (UTC): quiet at night, peaks at lunch and evening.
_HOUR_W = np.array(
    [0.9, 0.6, 0.45, 0.4, 0.45, 0.8, 1.6, 2.8, 3.8, 4.4, 4.8, 5.2,
     5.8, 5.6, 5.0, 4.8, 5.0, 5.6, 6.0, 5.8, 5.0, 4.0, 2.8, 1.7]
)  # fmt: skip
_NIGHT = np.arange(24) < 6  # hours 0-5
_BASE_MEDIAN = 32.5  # with the category mix, the overall median amount is about 40
_AMOUNT_SIGMA = 0.85
_ROAMING = 0.12  # share of transactions outside the card's home country
_FOREIGN_CURRENCY = 0.06  # share paid in a random currency
_HOME_IP = 0.7  # share of transactions from the card's usual IP address

# Fraud: a logistic score of what the row shows (amount in USD, category, night, device,
# country), then 2% label noise. Base rate ~12.5% and Bayes accuracy ~0.94 without drift;
# drift=1 moves the features towards the risky side: ~24% fraud, Bayes accuracy ~0.90.
_FRAUD_INTERCEPT = -3.0
_FRAUD_LOG_AMOUNT = 1.1  # per unit of log(USD amount / 40)
_FRAUD_CATEGORY = np.array([-0.6, -0.3, 0.0, -1.0, -0.6, 0.0, 0.0, 1.1, 1.0, 1.5, 2.0, 2.4])
_FRAUD_NIGHT = 1.8
_FRAUD_DEVICE = np.array([0.0, 0.9, 0.2, -0.6, 1.6])
_FRAUD_COUNTRY = np.zeros(len(COUNTRIES))
_FRAUD_COUNTRY[[COUNTRIES.index(c) for c in ("NG", "RU", "CN")]] = [2.4, 2.0, 1.6]
_FRAUD_SHARPNESS = 2.5
_LABEL_NOISE = 0.02

# Notes: (prefix, suffix, takes a number) for memos; (prefix, suffix) around the row's PII.
_MEMOS = (
    ("monthly subscription", "", False),
    ("tip included", "", False),
    ("order #", "", True),
    ("invoice INV-", "", True),
    ("split with roommate", "", False),
    ("gift card top-up", "", False),
    ("dinner, drinks", "", False),
    ("recurring payment", "", False),
    ("refund pending", "", False),
    ("booking ref ", "", True),
    ("loyalty points applied", "", False),
    ("contactless", "", False),
    ("pre-authorization hold", "", False),
    ("delivery fee included", "", False),
    ("receipt no. ", "", True),
    ("return within 30 days", "", False),
)
_EMAIL_NOTES = (
    ("refund requested by ", ""),
    ("receipt sent to ", ""),
    ("customer contact ", " for dispute"),
)
_CARD_NOTES = (("card ", " declined at "), ("paid with card ", ""), ("manual entry ", " approved"))
_IP_NOTES = (("login from ", ""), ("3ds challenge from ", ""), ("new device ip ", " flagged"))
_NOTE_RATE = 0.4
_NOTE_PII = 0.2  # of the non-null notes

_FIRST = (
    "james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "david",
    "elizabeth", "william", "barbara", "richard", "susan", "joseph", "jessica", "thomas",
    "sarah", "charles", "karen", "lena", "yuki", "ade", "olga", "wei", "priya", "lucas",
    "sofia", "mateo", "ines", "jan", "anna", "liam", "emma", "noah", "mia", "kofi", "ivan",
)  # fmt: skip
_LAST = (
    "smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "martin",
    "muller", "schmidt", "dubois", "rossi", "silva", "tanaka", "sato", "kumar", "singh",
    "nowak", "kowalski", "okafor", "ivanov", "chen", "wang", "lopez", "murphy", "walsh",
    "jansen", "berg", "costa", "taylor", "wilson", "moore", "clark", "lewis", "young",
)  # fmt: skip
_DOMAINS = (
    "example.com", "example.org", "example.net", "mail.example.com",
    "post.example.co.uk", "inbox.example.de",
)  # fmt: skip
_N_CARDS = 4000

# --- faults -----------------------------------------------------------------------------

_ROW_FAULTS = tuple(f for f in FAULTS if f != "truncated")
_FAULT_CODE = {kind: code for code, kind in enumerate(FAULTS)}
# Columns a `nulls` fault may empty: every required one but the id and the label.
_NULLABLE_TARGETS = (
    "amount", "currency", "merchant_category", "device", "country",
    "card_number", "email", "ip_address", "ts",
)  # fmt: skip
# Not numbers in any reader's default parsing (no "NaN", "N/A", "inf", ...).
_BAD_AMOUNTS = ("12,5O", "abc", "1.2.3", "twelve", "$12.50", "12..5", "O.99", "--5", "1e")
_BAD_CATEGORIES = ("crypto_atm", "pawn_shop", "wire_transfer", "adult", "lottery_kiosk")
_BAD_DEVICES = ("smartwatch", "kiosk", "smart_tv", "iot_fridge")

# RNG streams, so that no two draw from the same numbers.
_CARDS_STREAM, _CLEAN_STREAM, _FAULT_STREAM, _TRUNC_STREAM = 1, 2, 3, 4


def _rng(stream: int, seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, key])


def _draw(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    cdf = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(p) - 1)


def _boost(p: np.ndarray, where: np.ndarray | list[int], factor: float) -> np.ndarray:
    q = p.astype(float).copy()
    q[where] *= factor
    return q / q.sum()


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


# --- cards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cards:
    number: pa.Array  # 16 digits
    text: pa.Array  # the numbers as plain, spaced, dashed: 3 * _N_CARDS
    email: pa.Array
    home_ip: pa.Array
    home_country: np.ndarray
    cdf: np.ndarray  # how often each card is used


@functools.lru_cache(maxsize=4)
def _cards(seed: int) -> _Cards:
    """A few thousand cards, each with one email, home country and usual IP address."""
    rng = _rng(_CARDS_STREAM, seed, 0)
    n = _N_CARDS
    digits = np.empty((n, 16), dtype=np.int64)
    visa = rng.random(n) < 0.6
    digits[:, 0] = np.where(visa, 4, 5)
    digits[:, 1] = np.where(visa, rng.integers(0, 10, n), rng.integers(1, 6, n))
    digits[:, 2:15] = rng.integers(0, 10, (n, 13))
    while True:  # distinct numbers (a clash is ~1e-7 likely; redraw the clashing ones)
        values = digits[:, :15] @ (10 ** np.arange(14, -1, -1))
        _, first = np.unique(values, return_index=True)
        clash = np.setdiff1d(np.arange(n), first)
        if clash.size == 0:
            break
        digits[clash, 2:15] = rng.integers(0, 10, (clash.size, 13))
    # Luhn check digit: double every second digit from the right, starting left of it.
    doubled = digits[:, 0:15:2] * 2
    total = (doubled - 9 * (doubled > 9)).sum(axis=1) + digits[:, 1:15:2].sum(axis=1)
    digits[:, 15] = (10 - total % 10) % 10
    numbers = ["".join(map(str, row)) for row in digits.tolist()]
    spaced = [" ".join(s[i : i + 4] for i in range(0, 16, 4)) for s in numbers]
    dashed = [s.replace(" ", "-") for s in spaced]

    first = rng.integers(0, len(_FIRST), n)
    last = rng.integers(0, len(_LAST), n)
    style = rng.integers(0, 5, n)
    year = rng.integers(50, 100, n)
    num = rng.integers(1, 1000, n)
    domain = rng.choice(len(_DOMAINS), n, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.1])
    emails: list[str] = []
    seen: set[str] = set()
    for i in range(n):
        f, la = _FIRST[first[i]], _LAST[last[i]]
        local = (
            f"{f}.{la}",
            f"{f}{la}{year[i]}",
            f"{f[0]}{la}",
            f"{f}_{la}{num[i]}",
            f"{la}.{f}",
        )[style[i]]
        email = f"{local}@{_DOMAINS[domain[i]]}"
        if email in seen:
            email = f"{local}.{i}@{_DOMAINS[domain[i]]}"
        seen.add(email)
        emails.append(email)

    octets = np.column_stack([rng.integers(1, 224, n), rng.integers(0, 256, (n, 3))])
    home_ip = [".".join(map(str, row)) for row in octets.tolist()]
    activity = rng.lognormal(0.0, 1.0, n)
    return _Cards(
        number=pa.array(numbers, pa.string()),
        text=pa.array(numbers + spaced + dashed, pa.string()),
        email=pa.array(emails, pa.string()),
        home_ip=pa.array(home_ip, pa.string()),
        home_country=_draw(rng, _COUNTRY_P, n),
        cdf=np.cumsum(activity) / activity.sum(),
    )


_OCTETS = pa.array([str(i) for i in range(256)], pa.string())


# --- clean rows -------------------------------------------------------------------------


def _fraud_logit(
    usd: np.ndarray, category: np.ndarray, hour: np.ndarray, device: np.ndarray, country: np.ndarray
) -> np.ndarray:
    score = (
        _FRAUD_INTERCEPT
        + _FRAUD_LOG_AMOUNT * np.log(usd / 40.0)
        + _FRAUD_CATEGORY[category]
        + _FRAUD_NIGHT * _NIGHT[hour]
        + _FRAUD_DEVICE[device]
        + _FRAUD_COUNTRY[country]
    )
    return _FRAUD_SHARPNESS * score


def _clean_table(rows: int, seed: int, drift: float, start_id: int) -> pa.Table:
    rng = _rng(_CLEAN_STREAM, seed, start_id)
    cards = _cards(seed)
    n = rows
    card = np.minimum(np.searchsorted(cards.cdf, rng.random(n), side="right"), _N_CARDS - 1)

    roaming = rng.random(n) < _ROAMING
    country = np.where(roaming, _draw(rng, _COUNTRY_P, n), cards.home_country[card])
    currency = np.where(
        rng.random(n) < _FOREIGN_CURRENCY,
        rng.integers(0, len(CURRENCIES), n),
        _COUNTRY_CURRENCY[country],
    )
    category_p = _boost(_CATEGORY_P, [7, 9], 1.0 + 3.0 * drift)  # online_retail, electronics
    category = _draw(rng, category_p, n)
    device = _draw(rng, _boost(_DEVICE_P, [0], 1.0 + 2.0 * drift), n)  # mobile
    hour = _draw(rng, _boost(_HOUR_W, _NIGHT, 1.0 + 2.0 * drift), n)
    day = rng.integers(0, _DAYS, n)
    second = rng.integers(0, 3600, n)
    ts_us = (_START_S + day * 86_400 + hour * 3600 + second) * 1_000_000

    usd = (
        _BASE_MEDIAN
        * _CATEGORY_SCALE[category]
        * np.exp(_AMOUNT_SIGMA * rng.standard_normal(n) + 0.5 * drift)
    )
    amount = np.clip(np.round(usd * _FX[currency], 2), 0.01, MAX_AMOUNT)

    p = 1.0 / (1.0 + np.exp(-_fraud_logit(usd, category, hour, device, country)))
    fraud = (rng.random(n) < p) ^ (rng.random(n) < _LABEL_NOISE)

    home = rng.random(n) < _HOME_IP
    away = np.flatnonzero(~home)
    octets = [rng.integers(1, 224, away.size)] + [rng.integers(0, 256, away.size) for _ in "123"]
    random_ip = pc.binary_join_element_wise(*(_OCTETS.take(o) for o in octets), ".")
    ip = pc.replace_with_mask(cards.home_ip.take(card), pa.array(~home), random_ip)

    device_text = pa.array(DEVICES).take(device)
    note = _notes(rng, n, card, cards, ip, device_text)

    return pa.table(
        [
            pa.array(np.arange(start_id, start_id + n, dtype=np.int64)),
            pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            pa.array(amount),
            pa.array(CURRENCIES).take(currency),
            pa.array(MERCHANT_CATEGORIES).take(category),
            pa.array(COUNTRIES).take(country),
            device_text,
            cards.number.take(card),
            cards.email.take(card),
            ip,
            note,
            pa.array(fraud.astype(np.int64)),
        ],
        schema=SCHEMA,
    )


def _notes(
    rng: np.random.Generator,
    n: int,
    card: np.ndarray,
    cards: _Cards,
    ip: pa.Array,
    device: pa.Array,
) -> pa.Array:
    """~60% null; the rest short memos, a fifth of them quoting the row's email, card or IP."""
    rows = np.flatnonzero(rng.random(n) < _NOTE_RATE)
    k = rows.size
    # 0: a memo; 1, 2, 3: the row's email, card number or IP address inside the text.
    kind = np.where(rng.random(k) < _NOTE_PII, rng.integers(1, 4, k), 0)
    templates = [[(p, s) for p, s, _ in _MEMOS], _EMAIL_NOTES, _CARD_NOTES, _IP_NOTES]
    counts = np.array([len(t) for t in templates])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = [t for group in templates for t in group]
    template = offsets[kind] + (rng.random(k) * counts[kind]).astype(np.int64)
    takes_number = np.array([m[2] for m in _MEMOS] + [False] * (len(flat) - len(_MEMOS)))
    takes_device = np.zeros(len(flat), dtype=bool)
    takes_device[offsets[2]] = True  # "card ... declined at <device>"

    number = pc.cast(pa.array(rng.integers(1000, 100_000, k)), pa.string())
    style = rng.integers(0, 3, k)  # plain, spaced, dashed
    middle = pc.choose(
        pa.array(kind.astype(np.int8)),
        pc.if_else(pa.array(takes_number[template]), number, ""),
        cards.email.take(card[rows]),
        cards.text.take(style * _N_CARDS + card[rows]),
        ip.take(rows),
    )
    device_part = pc.if_else(pa.array(takes_device[template]), device.take(rows), "")
    prefix = pa.array([p for p, _ in flat]).take(template)
    suffix = pa.array([s for _, s in flat]).take(template)
    text = _join(prefix, middle, suffix, device_part)
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(mask), text)


def transactions_frame(
    rows: int, *, seed: int = 0, drift: float = 0.0, start_id: int = 0
) -> pd.DataFrame:
    """``rows`` clean transactions (no faults) with ids ``start_id ..``, as a DataFrame.

    Deterministic for ``(seed, drift, start_id, rows)``; the cards (and their emails) depend
    on ``seed`` alone, so frames of one seed share them.
    """
    _check_common(rows=rows, seed=seed, drift=drift)
    if not _is_int(start_id, 0):
        raise ValueError(f"start_id must be an int >= 0, got {start_id!r}")
    return _clean_table(int(rows), int(seed), float(drift), int(start_id)).to_pandas()


# --- faults -----------------------------------------------------------------------------


@dataclass
class _Shard:
    """One shard's rows after row-level faults, before it is written."""

    cols: dict[str, pa.Array]  # nulls, range, categories and duplicates applied
    kind: np.ndarray  # per row: the FAULTS code of its fault, -1 when clean
    bad_amount: pa.Array | None  # `types` rows' amount text, in row order
    aux: np.ndarray  # per row uniform draws in [0, 1) that shape `malformed` lines


def _inject(
    table: pa.Table, rng: np.random.Generator, rate: float, kinds: tuple[str, ...]
) -> _Shard:
    n = table.num_rows
    cols = {name: table.column(name).combine_chunks() for name in COLUMNS}
    kind = np.full(n, -1, dtype=np.int64)
    if rate <= 0 or not kinds:
        return _Shard(cols, kind, None, np.zeros((0, 2)))
    faulty = rng.random(n) < rate
    codes = np.array([_FAULT_CODE[k] for k in kinds])
    kind = np.where(faulty, codes[rng.integers(0, len(codes), n)], -1)
    aux = rng.random((n, 2))

    def replace(name: str, mask: np.ndarray, values: pa.Array) -> None:
        if mask.any():
            cols[name] = pc.replace_with_mask(cols[name], pa.array(mask), values)

    # duplicates: the txn_id of an earlier clean row of this shard; none earlier -> clean.
    dup = np.flatnonzero(kind == _FAULT_CODE["duplicates"])
    if dup.size:
        clean = np.flatnonzero(kind == -1)
        before = np.searchsorted(clean, dup)
        kind[dup[before == 0]] = -1
        dup, before = dup[before > 0], before[before > 0]
        ids = cols["txn_id"].to_numpy().copy()
        ids[dup] = ids[clean[(aux[dup, 0] * before).astype(np.int64)]]
        cols["txn_id"] = pa.array(ids)

    rows = np.flatnonzero(kind == _FAULT_CODE["range"])
    if rows.size:  # before `nulls`: the clean amounts have no nulls to lose
        amount = cols["amount"].to_numpy().copy()
        variant = (aux[rows, 0] * 3).astype(np.int64)
        too_big = np.round(MAX_AMOUNT + 0.01 + aux[rows, 1] * 100_000.0, 2)
        amount[rows] = np.select([variant == 0, variant == 1], [-amount[rows], 0.0], too_big)
        cols["amount"] = pa.array(amount)

    rows = np.flatnonzero(kind == _FAULT_CODE["nulls"])
    target = (aux[rows, 0] * len(_NULLABLE_TARGETS)).astype(np.int64)
    for i, name in enumerate(_NULLABLE_TARGETS):
        mask = np.zeros(n, dtype=bool)
        mask[rows[target == i]] = True
        replace(name, mask, pa.nulls(int(mask.sum()), cols[name].type))

    bad_amount = None
    rows = np.flatnonzero(kind == _FAULT_CODE["types"])
    if rows.size:
        bad_amount = pa.array(_BAD_AMOUNTS).take((aux[rows, 0] * len(_BAD_AMOUNTS)).astype(int))

    rows = np.flatnonzero(kind == _FAULT_CODE["categories"])
    for name, bad, share in (
        ("merchant_category", _BAD_CATEGORIES, aux[rows, 0] < 0.5),
        ("device", _BAD_DEVICES, aux[rows, 0] >= 0.5),
    ):
        mask = np.zeros(n, dtype=bool)
        mask[rows[share]] = True
        pick = (aux[mask, 1] * len(bad)).astype(np.int64)
        replace(name, mask, pa.array(bad).take(pick))

    return _Shard(cols, kind, bad_amount, aux)


# --- writing ----------------------------------------------------------------------------


def _amount_text(shard: _Shard, bad: pa.Array | None) -> pa.Array:
    text = pc.cast(shard.cols["amount"], pa.string())
    mask = shard.kind == _FAULT_CODE["types"]
    return text if bad is None else pc.replace_with_mask(text, pa.array(mask), bad)


def _parquet_bytes(shard: _Shard) -> bytes:
    table = pa.table(shard.cols, schema=SCHEMA)
    if shard.bad_amount is not None:
        # A Parquet column has one type per file: a shard with any `types` fault stores
        # `amount` as strings, the valid amounts as their decimal text ("12.34").
        table = table.set_column(
            COLUMNS.index("amount"), "amount", _amount_text(shard, shard.bad_amount)
        )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@functools.cache
def _clock() -> pa.Array:
    """The text of every second of a day, as HH:MM:SSZ."""
    return pa.array([f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86_400)])


@functools.cache
def _dates() -> pa.Array:
    return pa.array([f"{(TS_START + pd.Timedelta(days=d)):%Y-%m-%d}T" for d in range(_DAYS)])


def _ts_text(ts: pa.Array) -> pa.Array:
    """ISO-8601 text (2026-03-01T12:34:56Z) by table lookup: far faster than strftime."""
    seconds = pc.divide(pc.cast(ts, pa.int64()), 1_000_000)
    offset = pc.subtract(seconds, _START_S)
    return _join(
        _dates().take(pc.divide(offset, 86_400)), _clock().take(pc.remainder(offset, 86_400))
    )


def _csv_quote(text: pa.Array) -> pa.Array:
    """Standard CSV quoting: only values with a comma, quote or line break get quoted."""
    needs = pc.match_substring_regex(text, '[,"\r\n]')
    quoted = _join('"', pc.replace_substring(text, '"', '""'), '"')
    return pc.if_else(needs, quoted, text)


def _json_string(text: pa.Array, *, escape: bool) -> pa.Array:
    if escape:
        text = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
    return pc.fill_null(_join('"', text, '"'), "null")


def _fields(shard: _Shard, fmt: str) -> list[tuple[pa.Array, bool]]:
    """Each column's field text per row, and whether JSON must quote it around.

    CSV: "" for null, quoted where needed. JSON: values with null; a string column with no
    nulls comes raw (True), to be quoted by the text around it, saving a pass. Only `note`
    and the `types` strings are free text; the other string columns come from fixed
    alphabets (letters, digits, . _ @ : - and spaces): no CSV quoting, no JSON escaping.
    """
    t = shard.cols
    ints = [pc.cast(t[c], pa.string()) for c in ("txn_id", "is_fraud")]
    amount = pc.cast(t["amount"], pa.string())
    if shard.bad_amount is not None:
        bad = (
            _csv_quote(shard.bad_amount)
            if fmt == "csv"
            else _json_string(shard.bad_amount, escape=True)
        )
        amount = _amount_text(shard, bad)
    ts = _ts_text(t["ts"])
    plain = [t[c] for c in COLUMNS[3:10]]
    if fmt == "csv":
        values = [ints[0], ts, amount, *plain, _csv_quote(t["note"]), ints[1]]
        return [(pc.fill_null(v, ""), False) for v in values]

    def text(v: pa.Array, escape: bool = False) -> tuple[pa.Array, bool]:
        return (
            (v, True)
            if v.null_count == 0 and not escape
            else (_json_string(v, escape=escape), False)
        )

    return [
        (ints[0], False),
        text(ts),
        (pc.fill_null(amount, "null"), False),
        *(text(v) for v in plain),
        text(t["note"], escape=True),
        (ints[1], False),
    ]


def _malformed_lines(
    shard: _Shard, fields: list[tuple[pa.Array, bool]], fmt: str
) -> tuple[np.ndarray, list[str]]:
    """Rows with a `malformed` fault and the garbage line (no newline) written for each."""
    rows = np.flatnonzero(shard.kind == _FAULT_CODE["malformed"])
    if not rows.size:
        return rows, []
    columns = [
        [f'"{x}"' if quoted else x for x in values.take(rows).to_pylist()]
        for values, quoted in fields
    ]
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
    return rows, lines


def _text_bytes(shard: _Shard, fmt: str) -> tuple[bytes, np.ndarray]:
    """The shard as CSV or JSONL bytes and the byte offset where each record's line starts."""
    fields = _fields(shard, fmt)
    # One join per shard, the separators (and JSON's keys and quotes) as literals between
    # the columns. Large strings: a shard's text may pass 2 GiB.
    pieces: list[pa.Array | str] = []
    closing = ""
    for i, (column, (values, quoted)) in enumerate(zip(COLUMNS, fields, strict=True)):
        if fmt == "csv":
            pieces += ["," if i else "", values]
        else:
            opening = '"' if quoted else ""
            pieces += [f'{closing}{"," if i else "{"}"{column}":{opening}', values]
            closing = opening
    pieces.append("\n" if fmt == "csv" else closing + "}\n")
    pieces = [
        p.cast(pa.large_string()) if isinstance(p, pa.Array) else pa.scalar(p, pa.large_string())
        for p in pieces
    ]
    lines = pc.binary_join_element_wise(*pieces, pa.scalar("", pa.large_string()))
    rows, bad = _malformed_lines(shard, fields, fmt)
    if rows.size:
        mask = np.zeros(shard.kind.size, dtype=bool)
        mask[rows] = True
        bad = pa.array([b + "\n" for b in bad], pa.large_string())
        lines = pc.replace_with_mask(lines, pa.array(mask), bad)
    _, offsets_buf, data_buf = lines.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[
        lines.offset : lines.offset + len(lines) + 1
    ]
    header = (",".join(COLUMNS) + "\n").encode() if fmt == "csv" else b""
    body = memoryview(data_buf)[offsets[0] : offsets[-1]]
    return header + bytes(body), len(header) + offsets[:-1] - offsets[0]


def _truncate_text(data: bytes, starts: np.ndarray, csv: bool, rng: np.random.Generator) -> int:
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
    _check_common(rows=rows, seed=seed, drift=drift)
    rate = _check_rate(fault_rate)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if isinstance(faults, str):
        raise ValueError(f"faults must be a sequence of kinds such as ({faults!r},), not a str")
    faults = tuple(faults)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}: pass a subset of {FAULTS}")
    if not _is_int(rows_per_shard, 1):
        raise ValueError(f"rows_per_shard must be an int >= 1, got {rows_per_shard!r}")
    rows, seed, rows_per_shard = int(rows), int(seed), int(rows_per_shard)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: pass a folder (new or empty of shards)")
    existing = (
        sorted(p.name for f in FORMATS for p in out_dir.glob(f"transactions-*.{f}"))
        if out_dir.is_dir()
        else []
    )
    if existing:
        raise ValueError(
            f"{out_dir} already holds transaction shards ({existing[0]}, ...): "
            "pass a new or empty folder"
        )

    began = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = tuple(
        k for k in _ROW_FAULTS if k in faults and not (k == "malformed" and fmt == "parquet")
    )
    truncate = "truncated" in faults and rate > 0
    shards = math.ceil(rows / rows_per_shard)
    files: list[Path] = []
    present = 0
    counts = np.zeros(len(FAULTS), dtype=np.int64)
    for i in range(shards):
        start = i * rows_per_shard
        n = min(rows_per_shard, rows - start)
        shard = _inject(
            _clean_table(n, seed, float(drift), start),
            _rng(_FAULT_STREAM, seed, start),
            rate,
            kinds,
        )
        kind = shard.kind
        last = truncate and i == shards - 1
        if fmt == "parquet":
            data = _parquet_bytes(shard)
            if last:
                cut = _rng(_TRUNC_STREAM, seed, start).integers(-(-2 * len(data) // 3), len(data))
                data, kind = data[:cut], kind[:0]
                counts[_FAULT_CODE["truncated"]] += 1
        else:
            data, starts = _text_bytes(shard, fmt)
            if last:
                cut = _truncate_text(data, starts, fmt == "csv", _rng(_TRUNC_STREAM, seed, start))
                partial = int(np.searchsorted(starts, cut, side="right")) - 1
                data, kind = data[:cut], kind[:partial].copy()
                kind = np.append(kind, _FAULT_CODE["truncated"])
        path = out_dir / f"transactions-{i:05d}.{fmt}"
        path.write_bytes(data)
        files.append(path)
        present += kind.size
        counts += np.bincount(kind[kind >= 0], minlength=len(FAULTS))
    injected = {k: int(c) for k, c in zip(FAULTS, counts, strict=True) if c}
    return GenerateReport(sorted(files), present, injected, time.perf_counter() - began)


def _is_int(value: object, least: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _is_real(value: object) -> bool:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def _check_common(*, rows: int, seed: int, drift: float) -> None:
    if not _is_int(rows, 1):
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    if not _is_int(seed, 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not _is_real(drift) or drift < 0:
        raise ValueError(f"drift must be a number >= 0 (0 = none, 1 = strong), got {drift!r}")


def _check_rate(rate: float) -> float:
    if not _is_real(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault_rate must be a number in [0, 1], got {rate!r}")
    return float(rate)
