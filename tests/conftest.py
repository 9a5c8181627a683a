"""Shared helpers for every tier. Tiers add their own conftest (Ray, subprocesses)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.settings import Settings, load_settings
from app.workloads import get_workload

# The Ray cluster and the trained platform that the integration and chaos tiers share.
pytest_plugins = ["tests.ray_platform"]


class FakeClock:
    """A clock a test moves by hand: ``clock.now += 5``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` on loopback, and it can be bound (TIME_WAIT allowed,
    as servers bind with SO_REUSEADDR)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def slowloris(port: int, path: str, headers: dict[str, str], body: bytes,
              give_up_s: float) -> tuple[bytes, float]:  # fmt: skip
    """POST ``body`` to loopback ``port`` as a slowloris client does: the headers and 10
    bytes, then a byte every 0.2 s, until the server answers or closes. Returns what it
    answered and after how many seconds; fails after ``give_up_s`` without an answer."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    head = "\r\n".join([*lines, *(f"{k}: {v}" for k, v in headers.items())]) + "\r\n\r\n"
    answer, sent = b"", 10
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head.encode() + body[:sent])
        started = time.monotonic()
        conn.settimeout(0.2)
        while True:
            try:
                chunk = conn.recv(65536)
                if not chunk:
                    break  # closed
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
            except TimeoutError:
                pass
            assert time.monotonic() - started < give_up_s, "the slow body was never cut off"
            if sent < len(body) - 1:  # never the last byte
                try:
                    conn.sendall(body[sent : sent + 1])
                    sent += 1
                except OSError:
                    break
    return answer, time.monotonic() - started


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """The distribution's Prometheus pushgateway on a free loopback port; its URL."""
    exe = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if exe is None:
        pytest.fail(
            "prometheus-pushgateway is not on PATH: install the distribution's "
            "(`apt-get install prometheus-pushgateway`; .ci/run does it on a clean machine)"
        )
    log_path = tmp_path / "pushgateway.log"
    for _ in range(5):  # a port taken between free_port() and the bind: another one
        port = free_port()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                # No persistence file: Debian's binary defaults to one under /var/lib.
                [exe, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                stdout=log,
                stderr=log,
            )
        if _listens(proc, port):
            break
        _stop(proc)
    else:
        pytest.fail(f"the pushgateway did not start: {log_path.read_text()}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _listens(proc: subprocess.Popen, port: int, timeout_s: float = 20) -> bool:
    """Whether ``proc`` itself (not whoever else took the port) comes to listen on it."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            sockets = psutil.Process(proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
            return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SCALEDL_* or RAY_ADDRESS from the caller's shell leaks into a test."""
    import os

    for key in list(os.environ):
        if key.startswith("SCALEDL_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path, clean_env: None) -> Settings:
    return load_settings(storage_root=tmp_path / "store")


@pytest.fixture(scope="session")
def digits_frame() -> pd.DataFrame:
    return get_workload("digits").builtin_source()


def gateway_samples(url: str, prefix: str = "scaledl_") -> dict[tuple, float]:
    """What a pushgateway exposes for Prometheus: (name, sorted labels) -> value, for
    the series whose names start with ``prefix``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(prefix)
    }


def corrupt(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, str]]:
    """Break five rows of a digits frame in five ways; returns the frame and id -> rule."""
    # px_05 arrives as text, as a CSV export or a sloppy producer would write it.
    bad = frame.astype({"px_05": str, "px_06": "float64"}).copy()
    broken = {
        int(bad.loc[1, "id"]): "px_03: in_range(0, 16)",
        int(bad.loc[2, "id"]): "label: isin([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])",
        int(bad.loc[3, "id"]): "px_06: is_integer",
        int(bad.loc[4, "id"]): "px_05: not_nullable",
        int(bad.loc[5, "id"]): "px_05: coerce_dtype('float64')",
    }
    bad.loc[1, "px_03"] = 17
    bad.loc[2, "label"] = 11
    bad.loc[3, "px_06"] = 2.5
    bad.loc[4, "px_05"] = None
    bad.loc[5, "px_05"] = "smudge"
    return bad, broken


__all__ = ["corrupt", "free_port", "gateway_samples", "np"]
