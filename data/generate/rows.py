"""Clean transactions: what a row holds and how its values are drawn.

A few thousand cards (each with one email, home country and usual IP address) are drawn
from the seed alone; every transaction picks one of them and draws its own time, place,
amount, device and note, then a fraud label from what the row shows.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from data.generate.notes import draw_notes

CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CAD", "AUD")
MERCHANT_CATEGORIES = (
    "grocery", "restaurants", "fuel", "utilities", "pharmacy", "clothing",
    "entertainment", "online_retail", "travel", "electronics", "jewelry", "gambling",
)  # fmt: skip
DEVICES = ("mobile", "desktop", "tablet", "pos", "atm")
COUNTRIES = (
    "US", "GB", "DE", "FR", "ES", "IT", "NL", "CA", "AU", "JP",
    "BR", "MX", "IN", "PL", "SE", "IE", "PT", "NG", "RU", "CN",
)  # fmt: skip

MAX_AMOUNT = 50_000.0
TS_START = pd.Timestamp("2026-01-01T00:00:00Z")  # inclusive
TS_END = pd.Timestamp("2026-07-01T00:00:00Z")  # exclusive: the last second is 2026-06-30 23:59:59
START_S = int(TS_START.timestamp())
DAYS = (TS_END - TS_START).days  # 181

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
COLUMNS = tuple(SCHEMA.names)

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
_OCTETS = pa.array([str(i) for i in range(256)], pa.string())

# RNG streams, so that no two draw from the same numbers.
CARDS_STREAM, CLEAN_STREAM, FAULT_STREAM, TRUNC_STREAM = 1, 2, 3, 4


def rng_for(stream: int, seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, key])


def _draw(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    cdf = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(p) - 1)


def _boost(p: np.ndarray, where: np.ndarray | list[int], factor: float) -> np.ndarray:
    q = p.astype(float).copy()
    q[where] *= factor
    return q / q.sum()


# --- cards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cards:
    number: pa.Array  # 16 digits
    text: pa.Array  # the numbers as plain, spaced, dashed: 3 * _N_CARDS
    email: pa.Array
    home_ip: pa.Array
    home_country: np.ndarray
    cdf: np.ndarray  # how often each card is used


@functools.lru_cache(maxsize=4)
def _cards(seed: int) -> Cards:
    """A few thousand cards, each with one email, home country and usual IP address.

    Two numbers are the same in about one seed in 2e7 (two cards then share a number);
    no seed in 0 .. 120 000 does.
    """
    rng = rng_for(CARDS_STREAM, seed, 0)
    n = _N_CARDS
    digits = np.empty((n, 16), dtype=np.int64)
    visa = rng.random(n) < 0.6
    digits[:, 0] = np.where(visa, 4, 5)
    digits[:, 1] = np.where(visa, rng.integers(0, 10, n), rng.integers(1, 6, n))
    digits[:, 2:15] = rng.integers(0, 10, (n, 13))
    # Luhn check digit: double every second digit from the right, starting left of it.
    doubled = digits[:, 0:15:2] * 2
    total = (doubled - 9 * (doubled > 9)).sum(axis=1) + digits[:, 1:15:2].sum(axis=1)
    digits[:, 15] = (10 - total % 10) % 10
    plain = ["".join(map(str, row)) for row in digits.tolist()]
    spaced = [" ".join(s[i : i + 4] for i in range(0, 16, 4)) for s in plain]
    dashed = [s.replace(" ", "-") for s in spaced]

    first = rng.integers(0, len(_FIRST), n)
    last = rng.integers(0, len(_LAST), n)
    style = rng.integers(0, 5, n)
    year = rng.integers(50, 100, n)
    num = rng.integers(1, 1000, n)
    domain = rng.choice(len(_DOMAINS), n, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.1])
    emails: list[str] = []
    seen: set[str] = set()  # a repeated address gets the card's index: james.smith.17@...
    for i in range(n):
        f, la = _FIRST[first[i]], _LAST[last[i]]
        local = (f"{f}.{la}", f"{f}{la}{year[i]}", f"{f[0]}{la}", f"{f}_{la}{num[i]}", f"{la}.{f}")
        email = f"{local[style[i]]}@{_DOMAINS[domain[i]]}"
        if email in seen:
            email = f"{local[style[i]]}.{i}@{_DOMAINS[domain[i]]}"
        seen.add(email)
        emails.append(email)

    octets = np.column_stack([rng.integers(1, 224, n), rng.integers(0, 256, (n, 3))])
    home_ip = [".".join(map(str, row)) for row in octets.tolist()]
    activity = rng.lognormal(0.0, 1.0, n)
    return Cards(
        number=pa.array(plain, pa.string()),
        text=pa.array(plain + spaced + dashed, pa.string()),
        email=pa.array(emails, pa.string()),
        home_ip=pa.array(home_ip, pa.string()),
        home_country=_draw(rng, _COUNTRY_P, n),
        cdf=np.cumsum(activity) / activity.sum(),
    )


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


def clean_table(rows: int, seed: int, drift: float, start_id: int) -> pa.Table:
    """``rows`` clean transactions with ids ``start_id ..``, in :data:`SCHEMA`."""
    rng = rng_for(CLEAN_STREAM, seed, start_id)
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
    day = rng.integers(0, DAYS, n)
    second = rng.integers(0, 3600, n)
    ts_us = (START_S + day * 86_400 + hour * 3600 + second) * 1_000_000

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
    note = draw_notes(rng, card, cards, ip, device_text)

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


def transactions_frame(
    rows: int, *, seed: int = 0, drift: float = 0.0, start_id: int = 0
) -> pd.DataFrame:
    """``rows`` clean transactions (no faults) with ids ``start_id ..``, as a DataFrame.

    Deterministic for ``(seed, drift, start_id, rows)``; the cards (and their emails) depend
    on ``seed`` alone, so frames of one seed share them.
    """
    check_common(rows=rows, seed=seed, drift=drift)
    if not is_int(start_id, 0):
        raise ValueError(f"start_id must be an int >= 0, got {start_id!r}")
    return clean_table(int(rows), int(seed), float(drift), int(start_id)).to_pandas()


# --- arguments --------------------------------------------------------------------------


def is_int(value: object, least: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def is_real(value: object) -> bool:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def check_common(*, rows: int, seed: int, drift: float) -> None:
    if not is_int(rows, 1):
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    if not is_int(seed, 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not is_real(drift) or drift < 0:
        raise ValueError(f"drift must be a number >= 0 (0 = none, 1 = strong), got {drift!r}")
