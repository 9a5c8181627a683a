"""The free-text ``note`` of a transaction: mostly null, some memos, a few quoting PII.

A note is ``prefix + value + suffix``. A memo's value is a random number where the memo
ends in one ("order #48213"), else nothing; the other notes quote the row's email, card
number (plain, spaced or dashed) or IP address, as a support agent's would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from data.generate.rows import Cards

# (memo, whether a number follows it)
_MEMOS = (
    ("monthly subscription", False),
    ("tip included", False),
    ("order #", True),
    ("invoice INV-", True),
    ("split with roommate", False),
    ("gift card top-up", False),
    ("dinner, drinks", False),
    ("recurring payment", False),
    ("refund pending", False),
    ("booking ref ", True),
    ("loyalty points applied", False),
    ("contactless", False),
    ("pre-authorization hold", False),
    ("delivery fee included", False),
    ("receipt no. ", True),
    ("return within 30 days", False),
)
# (prefix, suffix) around the row's email, card number or IP address.
_EMAIL_NOTES = (
    ("refund requested by ", ""),
    ("receipt sent to ", ""),
    ("customer contact ", " for dispute"),
)
# The first one names the row's device after it: "card 4111 ... declined at pos".
_CARD_NOTES = (("card ", " declined at "), ("paid with card ", ""), ("manual entry ", " approved"))
_IP_NOTES = (("login from ", ""), ("3ds challenge from ", ""), ("new device ip ", " flagged"))
_NOTE_RATE = 0.4
_NOTE_PII = 0.2  # of the non-null notes

# All templates in one table; a group's templates start at its offset.
_GROUPS = [[(memo, "") for memo, _ in _MEMOS], _EMAIL_NOTES, _CARD_NOTES, _IP_NOTES]
_SIZES = np.array([len(g) for g in _GROUPS])
_OFFSETS = np.concatenate([[0], np.cumsum(_SIZES)[:-1]])
_PREFIX = pa.array([p for g in _GROUPS for p, _ in g])
_SUFFIX = pa.array([s for g in _GROUPS for _, s in g])
_TAKES_NUMBER = np.array([numbered for _, numbered in _MEMOS] + [False] * (_SIZES[1:].sum()))
_TAKES_DEVICE = _OFFSETS[2]


def draw_notes(
    rng: np.random.Generator, card: np.ndarray, cards: Cards, ip: pa.Array, device: pa.Array
) -> pa.Array:
    """~60% null; the rest short memos, a fifth of them quoting the row's email, card or IP.

    ``card`` is each row's index into ``cards``; ``ip`` and ``device`` are the rows' values.
    """
    n = card.size
    rows = np.flatnonzero(rng.random(n) < _NOTE_RATE)
    k = rows.size
    # 0: a memo; 1, 2, 3: the row's email, card number or IP address inside the text.
    group = np.where(rng.random(k) < _NOTE_PII, rng.integers(1, 4, k), 0)
    template = _OFFSETS[group] + (rng.random(k) * _SIZES[group]).astype(np.int64)
    number = pc.cast(pa.array(rng.integers(1000, 100_000, k)), pa.string())
    style = rng.integers(0, 3, k)  # plain, spaced, dashed
    value = pc.choose(
        pa.array(group.astype(np.int8)),
        pc.if_else(pa.array(_TAKES_NUMBER[template]), number, ""),
        cards.email.take(card[rows]),
        cards.text.take(style * len(cards.number) + card[rows]),
        ip.take(rows),
    )
    device_part = pc.if_else(pa.array(template == _TAKES_DEVICE), device.take(rows), "")
    text = pc.binary_join_element_wise(
        _PREFIX.take(template), value, _SUFFIX.take(template), device_part, ""
    )
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(mask), text)
