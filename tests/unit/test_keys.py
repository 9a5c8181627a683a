"""API keys: the keys file, `scaledl keys create`, scopes (no Ray)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from app.errors import ConfigError, Forbidden, Unauthorized
from app.keys import KeyRing, create_key, dev_key, key_sha256, read_keys_file


def test_created_keys_are_stored_hashed_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    predict, secret = create_key(path, "predict", "svc-a")
    admin, admin_secret = create_key(path, "admin")
    text = path.read_text()
    assert secret not in text and admin_secret not in text
    assert f"svc-a predict {key_sha256(secret)}" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys_file(path) == [predict, admin]
    with pytest.raises(ConfigError, match="already holds a key 'svc-a'"):
        create_key(path, "predict", "svc-a")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("svc predict", "expected `<id> <scope> <sha256>`, got 2 fields"),
        ("svc root " + "a" * 64, "scope 'root' is not one of predict, admin"),
        ("svc predict my-plain-secret", "hex SHA-256 (64 characters), not the key itself"),
        ("sv/c predict " + "a" * 64, "key id 'sv/c'"),
    ],
)
def test_a_broken_keys_file_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# header comment\n\n{line}\n")
    with pytest.raises(ConfigError, match=f"keys.txt:3: .*{re.escape(message)}"):
        read_keys_file(path)


def test_a_missing_keys_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scaledl keys create --scope predict"):
        read_keys_file(tmp_path / "nope.txt")


def test_scopes_401_for_unknown_or_missing_403_for_the_wrong_scope(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    _, predict = create_key(path, "predict", "app")
    _, admin = create_key(path, "admin", "ops")
    ring = KeyRing([*read_keys_file(path), dev_key("a-development-key")])
    assert ring.authorize(predict, "predict").id == "app"
    assert ring.authorize(admin, "predict").id == "ops"  # admin includes predict
    assert ring.authorize("a-development-key", "admin").id == "dev"
    with pytest.raises(Forbidden, match="key 'app' has scope 'predict'; this needs 'admin'"):
        ring.authorize(predict, "admin")
    with pytest.raises(Unauthorized, match="not recognised"):
        ring.authorize("guess", "predict")
    with pytest.raises(Unauthorized, match="missing API key"):
        ring.authorize(None, "predict")


def test_an_empty_key_ring_is_refused() -> None:
    with pytest.raises(ConfigError, match="never open"):
        KeyRing([])
