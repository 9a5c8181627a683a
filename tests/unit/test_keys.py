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


def test_a_key_is_never_glued_onto_a_hand_edited_last_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"ops admin {'a' * 64}")  # no trailing newline
    key, _ = create_key(path, "predict", "web")
    assert [k.id for k in read_keys_file(path)] == ["ops", "web"]


@pytest.fixture
def keys_settings(tmp_path: Path, clean_env: None):  # noqa: ANN201
    from app.settings import load_settings

    def make(**overrides: object):  # noqa: ANN202
        return load_settings(storage_root=tmp_path / "store", **overrides)

    return make


def test_serving_takes_the_keys_file_and_the_env_key_together(
    tmp_path: Path, keys_settings
) -> None:  # noqa: ANN001
    from app.serving import resolve_access

    settings = keys_settings(api_key="an-env-key-of-16+chars")
    create_key(settings.keys_file, "predict", "web")
    access = resolve_access(settings, dev=False)
    assert [k.id for k in access.keys] == ["web", "env"]
    assert (access.client_key, access.generated) == ("an-env-key-of-16+chars", False)


def test_serving_without_any_key_is_refused_outside_dev(keys_settings) -> None:  # noqa: ANN001
    from app.serving import resolve_access

    with pytest.raises(ConfigError, match="scaledl keys create --scope predict"):
        resolve_access(keys_settings(), dev=False)
    access = resolve_access(keys_settings(), dev=True)
    assert access.generated and [k.id for k in access.keys] == ["dev"]


def test_a_configured_keys_file_that_is_missing_is_an_error(tmp_path: Path, keys_settings) -> None:  # noqa: ANN001
    from app.serving import resolve_access

    with pytest.raises(ConfigError, match="does not exist"):
        resolve_access(keys_settings(api_keys_file=tmp_path / "nope.txt"), dev=True)


def test_the_demo_gets_a_usable_key_when_only_a_keys_file_exists(keys_settings) -> None:  # noqa: ANN001
    from app.serving import resolve_access

    settings = keys_settings()
    create_key(settings.keys_file, "predict", "web")
    access = resolve_access(settings, dev=True, need_client_key=True)
    assert access.generated and [k.id for k in access.keys] == ["web", "dev"]
    assert KeyRing(access.keys).authorize(access.client_key, "predict").id == "dev"
