"""System tier: the real CLI in subprocesses, real HTTP, a real `ray start --head`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.chaos.conftest import pytest_terminal_summary  # noqa: F401 - the chaos table
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus SCALEDL_* and RAY_ADDRESS, with the venv first on PATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SCALEDL_") and k != "RAY_ADDRESS"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


@dataclass(frozen=True)
class Head:
    dashboard: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A real `ray start --head --block`, stopped by SIGTERM to its pid (never `ray stop`).

    Started as the README starts a cluster to join, after `export $(scaledl serve
    transport)`: with the transport variables users get (serve.fast_transport)."""
    temp_dir = Path(f"/tmp/scaledl-ray-{os.getpid()}")
    dashboard_port = free_port()
    transport = subprocess.run(
        [str(BIN / "scaledl"), "serve", "transport"],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert transport, "serve.fast_transport is on by default: its variables are printed"
    env = clean_env(**dict(line.split("=", 1) for line in transport))
    # On SIGTERM a node drains, up to 30 s, until no worker holds a lease. After the jobs
    # of test_ray_job it waited the whole 30 s, even with the Serve app removed first
    # (the actors the jobs leave behind keep theirs). The tests are over: stop at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--temp-dir={temp_dir}",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    client_env = {**env, "RAY_ADDRESS": url, "RAY_AUTH_MODE": "token"}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            time.sleep(1)
        yield Head(url, client_env)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@dataclass(frozen=True)
class DemoRun:
    """What ``scaledl demo --no-keep`` printed and left, run once for the system tier."""

    result: subprocess.CompletedProcess
    folder: Path  # its working directory: the storage root is folder/.scaledl
    prometheus_port: int  # where its --monitor Prometheus listened


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """``scaledl demo --no-keep`` exactly as a user runs it (with 5 epochs, and --monitor),
    in a fresh folder: ingest digits, train both tiers, calibrate and promote the cascade,
    serve it, send the test split over HTTP, stop. tests/system/test_demo.py checks its
    report; the benchmarks and the Prometheus test serve the store it trained
    (:func:`trained_store`), so the system tier trains the platform once."""
    folder = tmp_path_factory.mktemp("demo")
    port, prometheus = free_port(), free_port()
    result = subprocess.run(
        [
            str(BIN / "scaledl"),
            "demo",
            "--no-keep",
            "--epochs",
            "5",
            "--monitor",
            "--monitor-port",
            str(prometheus),
        ],  # fmt: skip
        cwd=folder,
        env=clean_env(SCALEDL_SERVE__PORT=str(port), COLUMNS="160"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return DemoRun(result, folder, prometheus)


@pytest.fixture(scope="session")
def trained_store(demo_run: DemoRun) -> Path:
    """A storage root with digits ingested, both tiers trained and the cascade
    calibrated and promoted: the demo's (bench/serve.py's ``--store``)."""
    result = demo_run.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return demo_run.folder / ".scaledl"
