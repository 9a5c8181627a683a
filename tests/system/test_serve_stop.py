"""`scaledl serve` on its own local cluster, stopped as a service manager or a terminal
stops it: a signal to its whole process group. Nothing of the cluster is left behind
(Ray's HAProxy once was, in a process group of its own, holding the port), it exits 0,
and the next start on the same port serves.

First SIGTERM to the group (systemd's KillMode=control-group, a CI runner), then SIGINT
to the group (Ctrl-C in a terminal), each after a request was answered. Each start
inherits SIGINT ignored, as a command started with `&` in a shell script does: Python
then keeps it ignored unless the command takes it back, and `scaledl serve` once went on
serving after SIGINT to its group.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port, port_is_free
from tests.system.conftest import BIN, clean_env

pytestmark = pytest.mark.slow

KEY = "system-stop-start-key-0123456789"
SERVING = "serving; press Ctrl-C to stop"


def running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_serving(store: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    """`scaledl serve` in a session of its own, until it says it serves."""
    proc = subprocess.Popen(  # with SIGINT ignored, as `scaledl serve &` in a script
        ["sh", "-c", f"trap '' INT; exec {shlex.quote(str(BIN / 'scaledl'))} serve -w digits"],
        env=clean_env(SCALEDL_STORAGE_ROOT=str(store), SCALEDL_SERVE__PORT=str(port),
                      SCALEDL_API_KEY=KEY),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if SERVING in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 180
    while not ready.wait(1):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("scaledl serve did not come up:\n" + "".join(lines[-40:]))
    return proc, lines


def test_serve_stopped_by_a_signal_to_its_process_group_leaves_nothing_and_starts_again(
    trained_store: Path,
) -> None:
    port = free_port()
    body = {"instances": [[0.0] * 64]}
    for sig in (signal.SIGTERM, signal.SIGINT):
        assert port_is_free(port), f"port {port} is held before the start with {sig.name}"
        proc, lines = start_serving(trained_store, port)
        try:
            resp = httpx.post(f"http://127.0.0.1:{port}/v1/models/digits/predict",
                              json=body, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=30)  # fmt: skip
            assert resp.status_code == 200, resp.text
            tree = psutil.Process(proc.pid).children(recursive=True)
            names = {p.name() for p in tree if running(p)}
            assert "haproxy" in names and "raylet" in names, names  # the default transport
            started = time.monotonic()
            os.killpg(proc.pid, sig)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"scaledl serve still runs 60 s after {sig.name} to its "
                    "process group:\n" + "".join(lines[-20:])
                ) from None
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)
        left = [f"{p.pid} {p.name()}" for p in tree if running(p)]
        print(f"{sig.name} to the process group: exit {code} after {took:.1f} s, left {left}")
        for p in tree:  # so that a failure here leaves nothing to the next tests
            if running(p):
                p.kill()
        assert code == 0, "".join(lines[-40:])
        assert not left, left
        assert port_is_free(port), f"port {port} is still held after {sig.name}"
