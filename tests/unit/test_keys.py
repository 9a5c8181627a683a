"""API keys: the keys file, `scaledl keys create`, scopes (no Ray)."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import pytest

from app.errors import ConfigError, Forbidden, Unauthorized
from app.keys import KeyRing, create_key, dev_key, key_sha256, read_keys_file, revoke_key
from tests.conftest import FakeClock


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
        # A secret pasted into the wrong field is not echoed: the message reaches logs.
        ("svc " + "s3cr3t" * 8 + " " + "a" * 64, "scope (48 characters) is not one of"),
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
    # Only the env key travels in the args; the replicas read (and re-read) the file.
    assert [k.id for k in access.static_keys] == ["env"]
    assert access.keys_file == str(settings.keys_file)
    assert (access.client_key, access.generated) == ("an-env-key-of-16+chars", False)


def test_serving_without_any_key_is_refused_outside_dev(keys_settings) -> None:  # noqa: ANN001
    from app.serving import resolve_access

    with pytest.raises(ConfigError, match="scaledl keys create --scope predict"):
        resolve_access(keys_settings(), dev=False)
    access = resolve_access(keys_settings(), dev=True)
    assert access.generated and [k.id for k in access.keys] == ["dev"]
    assert access.keys_file is None  # no file yet: the replicas read none


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
    ring = KeyRing(access.static_keys, access.keys_file)  # what a replica builds
    assert ring.authorize(access.client_key, "predict").id == "dev"


# ---------------------------------------------------------------------------- revoke

WEB = "web predict " + "1" * 64
OPS = "ops admin " + "2" * 64
BATCH = "batch predict " + "3" * 64


def test_revoking_removes_only_that_key_and_keeps_the_file_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    text = f"# who holds what\n\n{WEB}  # the web app\n{OPS}\n# batch jobs:\n{BATCH}"
    path.write_text(text)
    path.chmod(0o600)
    revoked = revoke_key(path, "ops")
    assert (revoked.id, revoked.scope) == ("ops", "admin")
    assert path.read_text() == text.replace(f"{OPS}\n", "")  # comments, blanks: as they were
    assert [k.id for k in read_keys_file(path)] == ["web", "batch"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.txt"]  # no temporary file left


def test_revoking_an_unknown_id_names_the_ids_there_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"{WEB}\n{OPS}\n")
    with pytest.raises(
        ConfigError, match=r"holds no key 'wbe' \(its keys: web, ops\); `scaledl keys list`"
    ):
        revoke_key(path, "wbe")
    assert path.read_text() == f"{WEB}\n{OPS}\n"


# ---------------------------------------------------------------------------- reloading


@pytest.fixture
def serve_log():  # noqa: ANN201
    """What the ring logs to Ray Serve's logger (which need not propagate to the root)."""

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

        def warnings(self) -> list[str]:
            return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]

    logger = logging.getLogger("ray.serve")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_key_created_after_the_ring_is_accepted_after_poll_s(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    _, web = create_key(path, "predict", "web")
    clock = FakeClock()
    ring = KeyRing([], path, poll_s=2.0, clock=clock)
    _, batch = create_key(path, "predict", "batch")
    with pytest.raises(Unauthorized):
        ring.authorize(batch, "predict")  # not looked at yet
    clock.now = 2.0
    assert ring.authorize(batch, "predict").id == "batch"
    assert ring.authorize(web, "predict").id == "web"


def test_a_revoked_key_is_refused_after_poll_s_and_not_before(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    _, web = create_key(path, "predict", "web")
    _, ops = create_key(path, "admin", "ops")
    clock = FakeClock()
    ring = KeyRing([dev_key("a-development-key")], path, poll_s=2.0, clock=clock)
    assert ring.authorize(web, "predict").id == "web"
    revoke_key(path, "web")
    clock.now = 1.9
    assert ring.authorize(web, "predict").id == "web"
    clock.now = 2.0
    with pytest.raises(Unauthorized, match="not recognised") as refused:
        ring.authorize(web, "predict")
    assert refused.value.status_code == 401
    assert ring.authorize(ops, "predict").id == "ops"
    assert ring.authorize("a-development-key", "admin").id == "dev"  # static keys stay


def test_a_broken_or_missing_file_keeps_the_last_good_keys_and_warns_once(
    tmp_path: Path,
    serve_log,  # noqa: ANN001
) -> None:
    path = tmp_path / "keys.txt"
    _, web = create_key(path, "predict", "web")
    good = path.read_text()
    clock = FakeClock()
    ring = KeyRing([], path, poll_s=2.0, clock=clock)

    def every_poll_for_a_while() -> None:
        for _ in range(3):
            clock.now += 2.0
            assert ring.authorize(web, "predict").id == "web"

    path.write_text(good + "batch predict\n")  # half-edited
    every_poll_for_a_while()
    assert len(serve_log.warnings()) == 1  # once per change, not per request
    assert "keys.txt:2: expected `<id> <scope> <sha256>`" in serve_log.warnings()[0]
    path.unlink()
    every_poll_for_a_while()
    assert len(serve_log.warnings()) == 2 and "does not exist" in serve_log.warnings()[1]
    _, batch = create_key(path, "predict", "batch")  # valid again, without "web"
    clock.now += 2.0
    assert ring.authorize(batch, "predict").id == "batch"
    with pytest.raises(Unauthorized):
        ring.authorize(web, "predict")
    logged = " ".join(r.getMessage() for r in serve_log.records)
    assert web not in logged and batch not in logged and key_sha256(web) not in logged


def test_the_file_is_looked_at_once_per_poll_s_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.txt"
    _, web = create_key(path, "predict", "web")
    clock = FakeClock()
    ring = KeyRing([], path, poll_s=2.0, clock=clock)
    stats: list[object] = []
    real_stat = os.stat

    def counting_stat(target, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(target) == path:
            stats.append(target)
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    for now, expected in ((0.0, 0), (1.99, 0), (2.0, 1), (3.9, 1), (4.0, 2)):
        clock.now = now
        for _ in range(50):  # requests
            ring.authorize(web, "predict")
        assert len(stats) == expected, now


def test_a_ring_is_refused_when_no_key_could_ever_open_it(tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="never open"):
        KeyRing([], empty)
    assert KeyRing([dev_key("a-development-key")], empty).authorize("a-development-key", "predict")
    with pytest.raises(ConfigError, match="does not exist"):  # a file named must be there
        KeyRing([dev_key("a-development-key")], tmp_path / "nope.txt")
