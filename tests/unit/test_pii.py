"""PII: keyed pseudonyms that keep joins, redaction of free text, and the key's sources."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from app.errors import ConfigError
from data.pii import PiiKey, load_pii_key, redact_series, redact_text

KEY = PiiKey(b"k" * 32)


def test_pseudonyms_are_stable_keyed_and_keep_nulls() -> None:
    cards = pd.Series(["4111111111111111", None, "4111111111111111", "5500000000000004"])
    out = KEY.pseudonymize(cards)
    assert out[0] == out[2] != out[3]  # the same card joins with itself, not with others
    assert pd.isna(out[1])
    assert len(out[0]) == 32 and "4111" not in out[0]
    assert PiiKey(b"z" * 32).pseudonymize(cards)[0] != out[0]  # another key, other pseudonyms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("refund for jane.doe@example.com please", "refund for [EMAIL] please"),
        ("card 4111 1111 1111 1111 declined", "card [CARD] declined"),
        ("card 4111-1111-1111-1111 declined", "card [CARD] declined"),
        ("paid with 5500000000000004", "paid with [CARD]"),
        ("login from 10.2.33.4 at night", "login from [IP] at night"),
        ("login from 2001:db8:85a3::8a2e:370:7334", "login from [IP]"),
        ("order 12345 of 3 items at 12:30:45", "order 12345 of 3 items at 12:30:45"),
    ],
)
def test_free_text_loses_emails_cards_and_ips(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_redacting_a_column_keeps_nulls() -> None:
    out = redact_series(pd.Series(["mail a@b.io", None]))
    assert out[0] == "mail [EMAIL]" and pd.isna(out[1])


def test_the_key_comes_from_the_environment_a_file_or_dev(tmp_path: Path) -> None:
    assert load_pii_key("e" * 20, None, dev=False, dev_path=tmp_path / "x").secret == b"e" * 20
    file = tmp_path / "pii.key"
    file.write_text("f" * 24 + "\n")
    assert load_pii_key(None, file, dev=False, dev_path=tmp_path / "x").secret == b"f" * 24
    dev = load_pii_key(None, None, dev=True, dev_path=tmp_path / "dev.key")
    assert dev == load_pii_key(None, None, dev=True, dev_path=tmp_path / "dev.key")
    assert oct((tmp_path / "dev.key").stat().st_mode & 0o777) == "0o600"


def test_no_key_outside_dev_is_refused_with_how_to_set_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SCALEDL_PII_KEY=.*--dev"):
        load_pii_key(None, None, dev=False, dev_path=tmp_path / "x")
    with pytest.raises(ConfigError, match="at least 16"):
        load_pii_key("short", None, dev=False, dev_path=tmp_path / "x")
    with pytest.raises(ConfigError, match="does not exist"):
        load_pii_key(None, tmp_path / "missing", dev=False, dev_path=tmp_path / "x")


@pytest.mark.parametrize(
    "text",
    ["cc_4111111111111111", "card4111111111111111", "4111.1111.1111.1111", "ip_10.0.0.1"],
)
def test_values_glued_to_words_are_redacted_too(text: str) -> None:
    assert not any(ch.isdigit() for ch in redact_text(text).replace("cc_", ""))


def test_a_column_is_redacted_as_each_value_alone() -> None:
    """The column path scans for values that may hold PII first (RE2) and redacts only
    those: it must miss none, in any script's digits."""
    import random

    rng = random.Random(7)
    parts = [
        "a@b.io", "x.y@mail.example.org", "4111 1111 1111 1111", "5500000000000004",
        "٤١١١٤١١١٤١١١٤١١١", "10.2.33.4", "١٠.٢.٣.٤", "2001:db8::1", "fe80::1%eth0",
        "12:30:45", "order 1234", "@", "plain words", "é", " ", "-", ".", ":",
    ]  # fmt: skip
    texts = ["".join(rng.choices(parts, k=rng.randint(1, 5))) for _ in range(3000)]
    out = redact_series(pd.Series([*texts, None]))
    assert out[: len(texts)].tolist() == [redact_text(t) for t in texts]
    assert pd.isna(out.iloc[-1])
