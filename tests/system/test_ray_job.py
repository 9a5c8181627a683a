"""Stages as Ray jobs: `ray job submit --working-dir . -- python -m app …` against a real head."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.cli.reports import SAMPLE_DIGIT
from app.registry import Registry
from tests.conftest import free_port
from tests.system.conftest import BIN, REPO, Head, clean_env, ray_state

JOB_KEY = "job-key-for-the-system-test"

pytestmark = pytest.mark.slow


def submit(
    head: Head,
    storage: Path,
    *args: str,
    env: dict[str, str] | None = None,
    no_wait: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`ray job submit` of `python -m app ARGS`; ``no_wait`` adds ``--no-wait`` and its
    options (``--submission-id``), for a job the test acts on while it runs."""
    runtime_env = {"env_vars": {"SCALEDL_STORAGE_ROOT": str(storage), **(env or {})}}
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            *(("--no-wait", *no_wait) if no_wait else ()),
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
    # Each node has 1 CPU and each Ray Train worker asks 1: the workers ran on two nodes
    # and trained as one DeepSpeed group (gloo across them).
    workers = ray_state(ray_head.env, "actors", "class_name=RayTrainWorker")
    assert len(workers) == 4, workers  # 2 a tier
    assert len({w["node_id"] for w in workers}) >= 2, workers

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

    # The CPUs back for the next tests' training: the application goes.
    shutdown = subprocess.run(
        [str(BIN / "serve"), "shutdown", "-a", ray_head.dashboard, "-y"],
        env=ray_head.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr


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


def test_a_training_job_whose_driver_is_killed_continues_with_resume(
    ray_head: Head, trained_store: Path, tmp_path: Path
) -> None:
    """The driver of a `ray job submit` training job SIGKILLed after its first registered
    checkpoint (a node's OOM killer, a lost head pod): the job fails, its Ray Train
    controller and workers go with it. The same run submitted again with `--resume`
    continues from that checkpoint, and the model scores within 1 pt of the demo's
    uninterrupted run of the same tier, epochs and dataset version."""
    import signal

    import psutil

    storage = tmp_path / "store"
    shutil.copytree(trained_store / "datasets", storage / "datasets")  # the demo's version
    run, job_id = "driver-killed", f"driver-killed-{time.time_ns()}"
    started = submit(
        ray_head, storage, "train", "--workload", "digits", "--tier", "cheap", "--epochs", "5",
        "--run-name", run, no_wait=("--submission-id", job_id),
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    snapshot = storage / "runs" / run / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while not (snapshot.is_file() and json.loads(snapshot.read_text())["checkpoint_results"]):
        assert time.monotonic() < deadline, "the job registered no checkpoint"
        time.sleep(0.1)
    drivers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if "--run-name" in (p.info["cmdline"] or []) and run in p.info["cmdline"]
        and "app" in p.info["cmdline"]
    ]  # fmt: skip
    assert len(drivers) == 1, drivers
    os.kill(drivers[0].pid, signal.SIGKILL)
    status = ""
    while f"Job '{job_id}' failed" not in status:
        assert time.monotonic() < deadline, f"the job did not fail: {status}"
        time.sleep(1)
        said = subprocess.run(
            [str(BIN / "ray"), "job", "status", job_id], env=ray_head.env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        status = said.stdout + said.stderr

    resumed = submit(ray_head, storage, "train", "--workload", "digits", "--tier", "cheap",
                     "--resume", run)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    def metrics(store: Path) -> dict[str, float]:
        registry = Registry(f"sqlite:///{store / 'mlflow.db'}")
        ref = registry.resolve("digits-cheap", "challenger")
        return registry.client.get_run(ref.run_id).data.metrics

    after, uninterrupted = metrics(storage), metrics(trained_store)
    print(
        f"resumed from step {after['resumed_from_step']:.0f}: test accuracy "
        f"{after['test_accuracy']:.4f}, uninterrupted {uninterrupted['test_accuracy']:.4f}"
    )
    assert after["resumed_from_step"] > 0 and after["epochs_run"] == 5  # not from scratch
    assert abs(after["test_accuracy"] - uninterrupted["test_accuracy"]) <= 0.01
