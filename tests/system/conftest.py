"""System tier: the real CLI in subprocesses, real HTTP, a real `ray start --head`."""

from __future__ import annotations

import json
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

from app.runtime import FAST_TRANSPORT
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


WORKER_NODES = 3  # of 1 CPU each, beside a 1-CPU head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A real cluster of `ray start --block` processes: a head and three worker nodes
    that join it, each stopped by SIGTERM to its pid (never `ray stop`).

    Every node has 1 CPU, so that the two Ray Train workers (1 CPU each) must run on two
    nodes. On one host Serve's per-node HAProxy of every node but the first fails to
    bind the same ports (9101, 8404, the HTTP port) and restarts; requests go through
    the first. A real cluster has a host per node. Started
    as the README starts a cluster to join, after `eval "$(scaledl serve transport)"`:
    with the transport variables users get (serve.fast_transport). On one host, every
    node shares the storage root, as the nodes of a real cluster share a volume."""
    temp_dir = Path(f"/tmp/scaledl-ray-{os.getpid()}")
    dashboard_port, gcs_port = free_port(), free_port()
    bare = {k: v for k, v in clean_env().items() if k not in FAST_TRANSPORT}
    transport = subprocess.run(
        ["bash", "-c", f'out=$({BIN / "scaledl"} serve transport) && eval "$out" && env -0'],
        env=bare, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    env = dict(kv.split("=", 1) for kv in transport.split("\0")[:-1])
    assert FAST_TRANSPORT.items() <= env.items(), "serve.fast_transport is on by default"
    # On SIGTERM a node drains, up to 30 s, until no worker holds a lease. After the jobs
    # of test_ray_job it waited the whole 30 s, even with the Serve app removed first
    # (the actors the jobs leave behind keep theirs). The tests are over: stop at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # A node joins only with the cluster's token (~/.ray/auth_token) in token mode: without
    # it, its GCS client is refused (InvalidAuthToken) until `ray start` gives up.
    env["RAY_AUTH_MODE"] = "token"

    logs = tmp_path_factory.mktemp("ray-nodes")

    def start(*args: str) -> subprocess.Popen:
        # Each node's dashboard agent listens on 52365 unless told: on one host the
        # second node's agent, and with it the node, would die on the taken port.
        log = (logs / f"node-{len(nodes)}.log").open("w")
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    nodes: list[subprocess.Popen] = []

    nodes.append(
        start("--head", f"--temp-dir={temp_dir}", f"--port={gcs_port}",
              f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1")
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard_port}"
    client_env = {**env, "RAY_ADDRESS": url}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if nodes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            time.sleep(1)
        # One at a time: nodes started together on one host pick their free ports at
        # once, and a raylet then died on "bind: Address already in use".
        for joined in range(2, 2 + WORKER_NODES):
            # A temp dir of its own: nodes sharing one unpack a job's working_dir into
            # one folder, and one node's cleanup deleted it under another's job
            # (FileNotFoundError from os.getcwd() in the job's driver).
            nodes.append(
                start(f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={temp_dir}-{joined}")
            )
            while len(alive_nodes(client_env)) < joined:
                if any(n.poll() is not None for n in nodes) or time.monotonic() > deadline:
                    said = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
                    raise RuntimeError(f"the worker nodes did not join; their logs: {said}")
                time.sleep(0.5)
        yield Head(url, client_env)
    finally:
        for node in reversed(nodes):  # the workers first, then the head
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def alive_nodes(env: dict[str, str]) -> list[dict]:
    """The cluster's live nodes, as `ray list nodes` reports them."""
    return ray_state(env, "nodes", "state=ALIVE")


def ray_state(env: dict[str, str], kind: str, *filters: str) -> list[dict]:
    """`ray list KIND --detail` as JSON (the state API, through the dashboard)."""
    said = subprocess.run(
        [str(BIN / "ray"), "list", kind, "--detail", "--format=json", "--limit=10000",
         *(f"--filter={f}" for f in filters)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert said.returncode == 0, said.stdout + said.stderr
    if said.stdout.startswith("No resource"):  # what it prints for none, not []
        return []
    return json.loads(said.stdout)


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
