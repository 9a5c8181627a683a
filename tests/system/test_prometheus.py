"""A real Prometheus (`scaledl monitor`, the distribution's binary) scraping a running
graph under bounded load: its p99 agrees with the client's, its counts per status are
the client's, and the p99 alert goes pending or firing under an injected slowdown and
clears after it.

The rules are the project's, with their windows shortened by a test override (5 m rates
become 15 s, `for:` 5 s, the fresh-TSDB baseline the minute that ended 30 s ago, and
scrapes and evaluations every second), so a fault shows in seconds instead of minutes.
The graph runs on a local cluster with a dashboard, which writes the service-discovery
file the scrape config reads, on the default (fast) transport, with the metrics export
reporting every second. The fault is serve.faults (dev only), applied in place.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import free_port
from tests.system.conftest import BIN, REPO, clean_env

pytestmark = pytest.mark.slow

KEY = "system-prometheus-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALERT = "ScaledlLatencyP99AboveBaseline"
BUCKET_RATIO = 10 ** (1 / 10)  # the latency histogram's buckets (serve_graphs/metrics.py)


def shortened_rules(target: Path) -> Path:
    """cluster/prometheus/ copied to ``target`` with its windows shortened for a test."""
    shutil.copytree(REPO / "cluster" / "prometheus", target)
    config = target / "prometheus.yml"
    text = config.read_text()
    text = re.sub(r"scrape_interval: \w+", "scrape_interval: 1s", text)
    text = re.sub(r"evaluation_interval: \w+", "evaluation_interval: 1s", text)
    text = text.replace("refresh_interval: 10s", "refresh_interval: 1s")
    config.write_text(text)
    for rules in (target / "rules").glob("*.yml"):
        text = rules.read_text()
        for old, new in (
            ("[5m]", "[15s]"),
            ("[1h] offset 15m", "[1m] offset 30s"),
            ("interval: 1m", "interval: 1s"),
        ):
            text = text.replace(old, new)
        text = re.sub(r"for: \d+m", "for: 5s", text)
        rules.write_text(text)
    return target


class Load:
    """A bounded client on loopback: sequential predicts, a few malformed and unkeyed
    ones among them; every answer's status and latency, kept per phase."""

    def __init__(self, url: str, body: dict) -> None:
        self.url, self.body = url, body
        self.statuses: Counter = Counter()
        self.ms: list[float] = []  # the 200s' latencies
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                if i % 50 == 0:
                    big = b'{"instances": [[1e400]]}'  # past float64: a 400 naming it
                    headers = {**AUTH, "content-type": "application/json"}
                    resp = client.post(self.url, content=big, headers=headers)
                elif i % 75 == 0:
                    resp = client.post(self.url, json=self.body)  # no key: 401
                else:
                    started = time.perf_counter()
                    resp = client.post(self.url, json=self.body, headers=AUTH)
                    if resp.status_code == 200:
                        self.ms.append((time.perf_counter() - started) * 1000)
                self.statuses[str(resp.status_code)] += 1

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
        resp = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()
        assert resp["status"] == "success", resp
        return resp["data"]["result"]

    def by_status(self, at: float) -> Counter:
        rows = self.query('sum by (status) (ray_scaledl_requests_total{route="/v1/predict"})', at)
        return Counter({r["metric"]["status"]: round(float(r["value"][1])) for r in rows})

    def alert_state(self) -> str | None:
        rows = self.query(f'ALERTS{{alertname="{ALERT}"}}')
        return rows[0]["metric"]["alertstate"] if rows else None


def test_prometheus_agrees_with_the_client_and_the_p99_alert_fires_and_clears(
    trained_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from app.keys import dev_key
    from app.runtime import FAST_TRANSPORT
    from app.serving import deploy
    from app.settings import load_settings

    for name, value in {**FAST_TRANSPORT, "RAY_metrics_report_interval_ms": "1000"}.items():
        monkeypatch.setenv(name, value)  # the cluster's processes inherit them; later tests not
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)  # fmt: skip
    port = free_port()
    monitor = None
    try:
        settings = load_settings(storage_root=trained_store, serve={"port": port}, dev=True)
        endpoint = deploy(settings, "digits", [dev_key(KEY)])
        from app.registry import Registry

        version = Registry(settings.tracking_uri).resolve("digits-cascade").version

        def set_faults(faults: dict) -> None:
            serve = {"port": port, "faults": faults}
            deploy(load_settings(storage_root=trained_store, serve=serve, dev=True), "digits",
                   [dev_key(KEY)])  # fmt: skip

        prom_port = free_port()
        monitor = subprocess.Popen(
            [str(BIN / "scaledl"), "monitor", "--port", str(prom_port),
             "--prometheus-dir", str(shortened_rules(tmp_path / "prometheus"))],
            env=clean_env(SCALEDL_STORAGE_ROOT=str(tmp_path / "monitor-root")),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_for(lambda: _ready(prom.url), 60, "Prometheus did not come up")
        wait_for(lambda: prom.query('up{job="ray"} == 1'), 60, "the Ray node was not scraped")

        body = {"instances": [[0.0] * 64]}
        # Phase 1: normal traffic; the counts and the p99 Prometheus reads are the client's.
        time.sleep(3)
        start = time.time()
        before = prom.by_status(start)
        with Load(endpoint.predict_url, body) as load:
            time.sleep(20)
        end = time.time()
        time.sleep(5)  # the export reports every second, Prometheus scrapes every second
        after = prom.by_status(time.time())
        seen = after - before
        assert seen == load.statuses, (seen, load.statuses)
        assert set(load.statuses) >= {"200", "400", "401"}
        rows = prom.query(
            "histogram_quantile(0.99, sum by (le) (increase("
            f'ray_scaledl_request_latency_ms_bucket{{route="/v1/predict"}}[{end - start:.0f}s])))',
            end,
        )
        assert len(rows) == 1, rows
        row = rows[0]
        server_p99 = float(row["value"][1])
        client_p99 = float(np.percentile(load.ms, 99))
        print(f"p99: server (Prometheus) {server_p99:.1f} ms, client {client_p99:.1f} ms")
        assert client_p99 / BUCKET_RATIO - 2 <= server_p99 <= client_p99 * BUCKET_RATIO

        # Phase 2: the served version answers 200 ms later: the alert goes pending or firing.
        with Load(endpoint.predict_url, body):
            set_faults({version: {"delay_ms": 200}})
            state = wait_for(prom.alert_state, 90, f"{ALERT} did not go pending or firing")
            print(f"{ALERT}: {state}")
            assert state in ("pending", "firing")
            set_faults({})  # Phase 3: the fault removed, the alert clears
            wait_for(lambda: prom.alert_state() is None, 120, f"{ALERT} did not clear")
    finally:
        if monitor is not None:
            monitor.send_signal(signal.SIGTERM)
            monitor.wait(timeout=30)
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(read, timeout_s: float, message: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = read()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(message)
