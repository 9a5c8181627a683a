"""`scaledl demo --no-keep` end to end, as a user runs it, with fewer epochs."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.system.conftest import BIN, clean_env

pytestmark = pytest.mark.slow


def measure(output: str, name: str) -> str:
    match = re.search(rf"{re.escape(name)}\s*│\s*([^│]+?)\s*│", output)
    assert match, f"{name!r} not in the demo's report:\n{output}"
    return match.group(1)


def test_demo_trains_serves_and_reports_a_real_accuracy(tmp_path: Path) -> None:
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
        cwd=tmp_path,
        env=clean_env(SCALEDL_SERVE__PORT=str(port), COLUMNS="160"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    sys.stdout.write(out)  # the report lands in the test log
    assert float(measure(out, "cascade accuracy (HTTP)")) >= 0.95
    assert measure(out, "failed requests") == "0"
    escalated = float(measure(out, "share escalated to expensive").rstrip("%"))
    assert 0 < escalated < 60
    p50 = float(measure(out, "latency p50").removesuffix(" ms"))
    p99 = float(measure(out, "latency p99").removesuffix(" ms"))
    assert 0 < p50 <= p99 < 30_000  # under the client's timeout: nothing hung
    assert float(measure(out, "requests/s")) >= 1
    assert (tmp_path / ".scaledl" / "mlflow.db").is_file()
    # --monitor ran Prometheus with the rules beside it, and stopped it at the end
    assert f"Prometheus http://127.0.0.1:{prometheus}" in out
    assert (
        "Loading configuration file"
        in (tmp_path / ".scaledl/prometheus/prometheus.log").read_text()
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", prometheus))  # free again
