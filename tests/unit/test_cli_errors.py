"""The real CLI refuses bad input with one line that names the fix (no Ray is started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def scaledl(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("SCALEDL_") and k != "RAY_ADDRESS"
    }
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["train", "-w", "cats", "--tier", "cheap"],
            2,
            "unknown workload 'cats': use one of digits",
        ),
        (["train", "-w", "digits", "--tier", "huge"], 2, "unknown tier 'huge'"),
        (
            ["train", "-w", "digits", "--tier", "cheap"],
            1,
            "run `scaledl data ingest --workload digits` first",
        ),
        (["data", "show", "abc123", "-w", "digits"], 1, "dataset version 'abc123' not found"),
        (
            ["data", "ingest", "-w", "digits", "--source", "missing/"],
            2,
            "source missing/ does not exist",
        ),
        (["serve", "-w", "digits"], 2, "set SCALEDL_API_KEY"),
        (
            ["serve", "-w", "digits", "--dev"],
            1,
            "no calibrated cascade 'champion' for digits",
        ),
        (["models", "promote", "digits-cheap", "3"], 1, "has no version or alias '3'"),
        (["route", "show", "digits"], 2, "set SCALEDL_API_KEY, or pass --key-file"),
        (["rollout", "status", "digits"], 2, "set SCALEDL_API_KEY, or pass --key-file"),
        (["route", "show", "digits", "--key-file", "nope.txt"], 2, "nope.txt cannot be read"),
        (["route", "show", "digits", "--key-file", "empty.txt"], 2, "empty.txt is empty"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    result = scaledl(*args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "-w", "digits", "--dev", "--no-keep"], {}, "set RAY_ADDRESS"),
        (["serve", "config", "-w", "digits"], {"SCALEDL_DEV": "true"}, "keys someone holds"),
        (["data", "versions", "-w", "digits"], {"SCALEDL_API_KEY": ""}, "at least 16"),
        (["data", "versions", "-w", "digits"], {"SCALEDL_CONFIG": "bad.yaml"}, "not valid YAML"),
        (
            ["data", "ingest", "-w", "digits"],
            {"RAY_ADDRESS": "127.0.0.1:1", "SCALEDL_STORAGE_ROOT": "{tmp}/store"},
            "no Ray cluster answers at 127.0.0.1:1",
        ),
    ],
)
def test_bad_config_is_refused_before_anything_runs(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1\n")
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    result = scaledl(*args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_from_env_is_named(tmp_path: Path) -> None:
    result = scaledl(
        "data", "versions", "-w", "digits", cwd=tmp_path, env={"SCALEDL_SERVE__PORT": "99999"}
    )
    assert result.returncode == 2
    assert "serve.port" in result.stderr and "SCALEDL_SERVE__PORT" in result.stderr


def test_versions_and_show_describe_a_published_version(tmp_path: Path) -> None:
    from tests.unit.test_split_and_versions import published

    published(tmp_path / ".scaledl" / "datasets", "abc123def456")
    listed = scaledl("data", "versions", "-w", "digits", cwd=tmp_path)
    assert listed.returncode == 0 and "abc123def456" in listed.stdout
    shown = scaledl("data", "show", "abc1", "-w", "digits", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["version"] == "abc123def456"
    explained = scaledl("data", "show", "latest", "-w", "digits", cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert "dataset digits abc123def456" in explained.stdout and "sources" in explained.stdout


def test_keys_create_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    import hashlib

    created = scaledl("keys", "create", "--scope", "predict", "--id", "web", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.splitlines()[1].strip()
    stored = (tmp_path / ".scaledl" / "api-keys.txt").read_text()
    assert stored == f"web predict {hashlib.sha256(secret.encode()).hexdigest()}\n"
    listed = scaledl("keys", "list", cwd=tmp_path)
    assert "web" in listed.stdout and secret not in listed.stdout
    wrong = scaledl("keys", "create", "--scope", "root", cwd=tmp_path)
    assert wrong.returncode == 2 and "unknown scope 'root'" in wrong.stderr


def test_keys_revoke_removes_the_key_and_names_the_ids_for_an_unknown_one(tmp_path: Path) -> None:
    for key_id in ("web", "ops"):
        created = scaledl("keys", "create", "--scope", "predict", "--id", key_id, cwd=tmp_path)
        assert created.returncode == 0, created.stderr
    revoked = scaledl("keys", "revoke", "web", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert "key web (predict) revoked" in revoked.stdout
    stored = (tmp_path / ".scaledl" / "api-keys.txt").read_text()
    assert [line.split()[0] for line in stored.splitlines()] == ["ops"]
    unknown = scaledl("keys", "revoke", "web", cwd=tmp_path)
    assert unknown.returncode == 2, unknown.stderr
    assert unknown.stderr.startswith("error: ") and "(its keys: ops)" in unknown.stderr
    assert "scaledl keys list" in unknown.stderr and "Traceback" not in unknown.stderr


def test_the_admin_key_comes_from_a_file_or_the_environment_never_the_command_line(
    tmp_path: Path,
) -> None:
    secret = "admin-secret-0123456789"
    on_line = scaledl("route", "show", "digits", "--key", secret, cwd=tmp_path)
    assert on_line.returncode == 2 and "No such option: --key" in on_line.stderr
    (tmp_path / "admin.key").write_text(secret + "\n")
    nobody = "http://127.0.0.1:9"  # nothing listens: the key was read, the call was made
    for how, env in ((["--key-file", "admin.key"], {}), ([], {"SCALEDL_API_KEY": secret})):
        result = scaledl(
            "rollout", "status", "digits", "--url", nobody, *how, cwd=tmp_path, env=env
        )
        assert "no service answered at http://127.0.0.1:9" in result.stderr, result.stderr
        assert secret not in result.stderr + result.stdout
