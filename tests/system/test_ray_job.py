"""Stages as Ray jobs: `ray job submit --working-dir . -- python -m app …` against a real head."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.cli.reports import SAMPLE_DIGIT
from app.registry import Registry
from tests.conftest import free_port
from tests.system.conftest import BIN, REPO, Head, clean_env

JOB_KEY = "job-key-for-the-system-test"

pytestmark = pytest.mark.slow


def submit(
    head: Head, storage: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    runtime_env = {"env_vars": {"SCALEDL_STORAGE_ROOT": str(storage), **(env or {})}}
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "app",
            *args,
        ],
        env=head.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_stage_runs_as_a_ray_job_and_the_service_answers(
    ray_head: Head, tmp_path: Path
) -> None:
    storage = tmp_path / "shared-store"
    ingest = submit(ray_head, storage, "data", "ingest", "--workload", "digits")
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
    assert "succeeded" in ingest.stdout
    manifests = list((storage / "datasets" / "digits").glob("*/manifest.json"))
    assert len(manifests) == 1
    version = json.loads(manifests[0].read_text())["version"]
    assert f"version {version}" in ingest.stdout

    for tier in ("cheap", "expensive"):
        train = submit(
            ray_head, storage, "train", "--workload", "digits", "--tier", tier, "--epochs", "1"
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        ref = Registry(f"sqlite:///{storage / 'mlflow.db'}").resolve(f"digits-{tier}")
        assert ref.tags["dataset_version"] == version

    calibrate = submit(ray_head, storage, "calibrate", "--workload", "digits", "--promote")
    assert calibrate.returncode == 0, calibrate.stdout[-3000:] + calibrate.stderr[-3000:]
    assert "digits-cascade/1" in calibrate.stdout

    port = free_port()
    deploy = submit(
        ray_head, storage, "serve", "--workload", "digits", "--no-keep",
        env={"SCALEDL_API_KEY": JOB_KEY, "SCALEDL_SERVE__PORT": str(port)},
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    # The application outlives the job that deployed it.
    resp = httpx.post(
        f"http://127.0.0.1:{port}/v1/models/digits/predict",
        json={"instances": [SAMPLE_DIGIT]},
        headers={"Authorization": f"Bearer {JOB_KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["label"] == 0

    # The same application as a Serve config YAML, redeployed by Ray's own `serve deploy`
    # with a key from the keys file: once the new key is accepted, the YAML's app serves.
    local = clean_env(SCALEDL_STORAGE_ROOT=str(storage), SCALEDL_SERVE__PORT=str(port))
    created = scaledl_cli("keys", "create", "--scope", "predict", "--id", "yaml", env=local)
    yaml_key = created.stdout.splitlines()[1].strip()
    config = scaledl_cli("serve", "config", "--workload", "digits", env=local)
    (tmp_path / "serve.yaml").write_text(config.stdout)
    deploy_yaml = subprocess.run(
        [str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"), "-a", ray_head.dashboard],
        env=ray_head.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert deploy_yaml.returncode == 0, deploy_yaml.stdout + deploy_yaml.stderr
    deadline = time.monotonic() + 180
    status = None
    while status != 200 and time.monotonic() < deadline:
        time.sleep(2)
        try:
            status = httpx.post(
                f"http://127.0.0.1:{port}/v1/models/digits/predict",
                json={"instances": [SAMPLE_DIGIT]},
                headers={"Authorization": f"Bearer {yaml_key}"},
                timeout=30,
            ).status_code
        except httpx.HTTPError:  # replicas being replaced
            status = None
    assert status == 200, f"the YAML-deployed app never accepted its key (last: {status})"


def scaledl_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "scaledl"), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_failing_stage_fails_the_job_with_its_message(ray_head: Head, tmp_path: Path) -> None:
    result = submit(
        ray_head, tmp_path / "empty", "train", "--workload", "digits", "--tier", "cheap"
    )
    assert result.returncode != 0
    assert "no dataset version for workload 'digits'" in result.stdout + result.stderr
