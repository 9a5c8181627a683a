"""PII handling: keyed pseudonyms for identifiers, redaction for free text.

Identifiers (a card number, an email) become ``HMAC-SHA256(key, value)`` in hex: the same
value always gives the same pseudonym under one key, so joins and counts still work, and
without the key nobody can go back. Free text keeps its words but loses every email,
card number and IP address inside it. Both run before anything is written: valid rows,
the quarantine, features and logs only ever see the pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import ConfigError

PII_KEY_ENV = "SCALEDL_PII_KEY"
MIN_KEY_LENGTH = 16
PSEUDONYM_HEX = 32  # 128 bits: collisions are not a concern at any realistic row count

# Every pattern may start only where its run of characters starts (the lookbehinds):
# the same matches, in linear time. Without them a 1 MB line of letters took minutes,
# each of its positions scanning to the end of the run for an @.
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by spaces, dashes or dots: every common card layout,
# also glued to letters ("card4111…"), which a word boundary would miss.
_CARD = re.compile(r"(?<!\d)\d(?:[ .-]?\d){12,18}(?!\d)")
_IPV4 = re.compile(r"(?<!\d)(?:\d{1,3}\.){3}\d{1,3}(?!\d)")
# Candidates only (a clock time looks alike): ipaddress decides what is an IPv6 address.
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")


def _ipv6(match: re.Match[str]) -> str:
    try:
        ipaddress.IPv6Address(match.group(0))
    except ValueError:
        return match.group(0)
    return "[IP]"


REDACTIONS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (_EMAIL, "[EMAIL]"),
    (_CARD, "[CARD]"),
    (_IPV4, "[IP]"),
    (_IPV6, _ipv6),
)


@dataclass(frozen=True)
class PiiKey:
    """The secret behind the pseudonyms; its fingerprint (not the key) enters version ids."""

    secret: bytes

    @property
    def fingerprint(self) -> str:
        return hmac.new(self.secret, b"scaledl-pii-key-id", hashlib.sha256).hexdigest()[:12]

    def pseudonymize(self, values: pd.Series) -> pd.Series:
        """Each non-null value -> its pseudonym; nulls stay null. Repeated values are
        hashed once (identifiers repeat a lot: one card, many transactions)."""
        codes, uniques = pd.factorize(values.astype(object), use_na_sentinel=True)
        digests = np.asarray([self.pseudonym(str(u)) for u in uniques] + [None], dtype=object)
        return pd.Series(digests[codes], index=values.index, dtype=object)  # -1 -> None

    def pseudonym(self, value: str) -> str:
        return hmac.digest(self.secret, value.encode(), "sha256").hex()[:PSEUDONYM_HEX]


def redact_text(text: str) -> str:
    """``text`` with every email, card number and IP address replaced by a marker."""
    for pattern, marker in REDACTIONS:
        text = pattern.sub(marker, text)
    return text


# A line that could not be parsed may be cut anywhere, inside an email or a card number:
# its text also loses every token with an @ and every run of 6 or more digits.
_FRAGMENTS = (
    (
        re.compile(r"(?<![^\s\"',;:{}\[\]<>])(?=[^\s\"',;:{}\[\]<>]*@)[^\s\"',;:{}\[\]<>]+"),
        "[EMAIL]",
    ),
    (re.compile(r"(?<!\d)\d(?:[ .-]?\d){5,}"), "[NUMBER]"),
)


def redact_fragments(text: str) -> str:
    """:func:`redact_text`, then also partial emails and long numbers: for text cut at an
    unknown place, where a whole value cannot be told from a fragment of one."""
    text = redact_text(text)
    for pattern, marker in _FRAGMENTS:
        text = pattern.sub(marker, text)
    return text


# A name that came from outside (a CSV header, a JSONL key, a request field) is shown in
# an error only when it looks like a column name: a header-less CSV's "header" is its
# first row's values, and a JSONL key can be anything a client sent.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,39}")


def shown_name(name: object) -> str:
    """``name`` quoted, if it is safe to echo in an error; else only its length."""
    text = str(name)
    if _NAME.fullmatch(text) and redact_fragments(text) == text:
        return repr(text)
    return f"({len(text)} characters, not shown)"


# What every match of REDACTIONS contains (an @; 13 digits; a dotted quad; two colons
# at most 4 hex digits apart), for RE2, which has no lookbehind: one vectorised scan
# picks the values that may hold PII, and only those go through Python's patterns. Its
# digits are Unicode's, as Python's \d is.
_MAY_HOLD_PII = r"@|\p{Nd}(?:[ .-]?\p{Nd}){12}|\p{Nd}\.\p{Nd}+\.\p{Nd}+\.\p{Nd}|:[0-9A-Fa-f]{0,4}:"


def redact_series(values: pd.Series) -> pd.Series:
    """:func:`redact_text` over a column (nulls stay null)."""
    out = values.astype(object)
    present = out.notna()
    if present.any():
        text = out[present].astype(str)
        suspect = _may_hold_pii(text)
        out[present] = text.where(~suspect, text[suspect].map(redact_text))
    return out


def _may_hold_pii(text: pd.Series) -> np.ndarray:
    """Per value: may it hold something :data:`REDACTIONS` replaces (never a false no)."""
    import pyarrow
    import pyarrow.compute

    values = pyarrow.array(text.to_numpy(dtype=object), pyarrow.string())
    return pyarrow.compute.match_substring_regex(values, _MAY_HOLD_PII).to_numpy(
        zero_copy_only=False
    )


def load_pii_key(key: str | None, key_file: Path | None, *, dev: bool, dev_path: Path) -> PiiKey:
    """The PII key: ``SCALEDL_PII_KEY``, else the key file, else (``--dev`` only) a key
    generated once into ``dev_path``. Anything else is refused with how to set one."""
    if key:
        return _checked(key.encode(), PII_KEY_ENV)
    if key_file is not None:
        if not key_file.is_file():
            raise ConfigError(
                f"PII key file {key_file} does not exist: create it (e.g. `python -c "
                f"'import secrets; print(secrets.token_urlsafe(32))' > {key_file}`) or unset "
                "pii_key_file"
            )
        return _checked(key_file.read_bytes().strip(), str(key_file))
    if dev:
        if not dev_path.is_file():
            dev_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dev_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
        return _checked(dev_path.read_bytes().strip(), str(dev_path))
    raise ConfigError(
        "this workload holds PII and no PII key is set: export "
        f"{PII_KEY_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') "
        "or set pii_key_file to a secret file (keep the key: it decides every pseudonym); "
        "for a throwaway local run pass --dev"
    )


def _checked(secret: bytes, where: str) -> PiiKey:
    if len(secret) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"the PII key from {where} has {len(secret)} characters; it needs at least "
            f"{MIN_KEY_LENGTH}: generate one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return PiiKey(secret)
