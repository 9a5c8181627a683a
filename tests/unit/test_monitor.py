"""`scaledl monitor` runs the distribution's Prometheus with the project's rules, and stops
it with itself; the Grafana dashboard's queries all evaluate on that Prometheus.

No Ray here: Ray's discovery file is written by hand, listing Prometheus's own /metrics, so
the scrape path (file_sd on the Ray temp root) is exercised end to end all the same. Like
test_prometheus_rules.py, these fail (with the install hint in the output) on a machine
without the `prometheus` package; `.ci/run` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest
import yaml

from app.cli.reports import url_lines
from app.serving import Endpoint
from tests.conftest import free_port, port_is_free

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "cluster" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD = REPO / "cluster" / "grafana" / "scaledl.json"
START_TIMEOUT_S = 40
T = TypeVar("T")

# What Grafana puts in for its built-in variables before a query leaves it.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def env_for(storage: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SCALEDL_") and k != "RAY_ADDRESS"
    }
    return {**env, "SCALEDL_STORAGE_ROOT": str(storage), "PYTHONUNBUFFERED": "1", **extra}


def monitor_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "app", "monitor", *args]


def run_monitor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A run that is expected to fail before Prometheus starts."""
    return subprocess.run(
        monitor_args(*args), env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


@dataclass
class Monitor:
    proc: subprocess.Popen
    port: int
    output: Path
    storage: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text()

    def prometheus(self) -> psutil.Process:
        (child,) = [p for p in psutil.Process(self.proc.pid).children() if p.name() == "prometheus"]
        return child


def start_monitor(tmp: Path, *args: str, port: int | None = None) -> Monitor:
    port = port or free_port()
    output = tmp / "monitor.out"
    with output.open("w") as out:
        proc = subprocess.Popen(
            monitor_args("--port", str(port), *args),
            env=env_for(tmp / "store"),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    monitor = Monitor(proc, port, output, tmp / "store")
    deadline = time.monotonic() + START_TIMEOUT_S
    while "press Ctrl-C to stop" not in monitor.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"scaledl monitor did not come up:\n{monitor.text()}")
        time.sleep(0.1)
    return monitor


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def poll(check: Callable[[], T], timeout_s: float = 20.0) -> T:
    """The first truthy answer of ``check``, or its last answer when time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def rule_names() -> tuple[set[str], set[str]]:
    records, alerts = set(), set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts.add(rule["alert"])
                else:
                    records.add(rule["record"])
    return records, alerts


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    """One `scaledl monitor`, with a discovery file in a Ray temp root of its own that
    lists Prometheus itself (as Ray's lists the nodes' exports), and a Grafana named."""
    tmp = tmp_path_factory.mktemp("monitor")
    ray_tmp = tmp / "ray"
    ray_tmp.mkdir()
    port = free_port()
    (ray_tmp / "prom_metrics_service_discovery.json").write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{port}"]}])
    )
    grafana = ("--grafana", "http://127.0.0.1:3000")
    m = start_monitor(tmp, "--ray-temp-dir", str(ray_tmp), *grafana, port=port)
    try:
        yield m
    finally:
        stop(m.proc)


def query(monitor: Monitor, expr: str) -> dict:
    resp = httpx.get(f"{monitor.url}/api/v1/query", params={"query": expr}, timeout=10)
    return {"http": resp.status_code, **resp.json()}


# ---------------------------------------------------------------------------- monitor


def test_monitor_runs_prometheus_with_the_projects_rules_under_the_storage_root(
    monitor: Monitor,
) -> None:
    assert httpx.get(f"{monitor.url}/-/ready", timeout=5).status_code == 200
    records, alerts = rule_names()
    assert "ScaledlLatencyP99AboveBaseline" in alerts

    def loaded() -> set[str]:
        groups = httpx.get(f"{monitor.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        return {rule["name"] for group in groups for rule in group["rules"]}

    assert poll(lambda: records | alerts <= loaded(), timeout_s=10), loaded()
    home = monitor.storage / "prometheus"
    assert (home / "prometheus.yml").is_file() and (home / "data").is_dir()
    assert monitor.prometheus().is_running()


def test_monitor_prints_the_url_and_what_the_ray_dashboard_needs(monitor: Monitor) -> None:
    text = monitor.text()
    assert f"Prometheus  {monitor.url}" in text
    assert f"export RAY_PROMETHEUS_HOST={monitor.url}" in text
    assert "export RAY_GRAFANA_HOST=http://127.0.0.1:3000" in text
    assert "ray start --head" in text


def test_monitor_scrapes_what_rays_discovery_file_lists(monitor: Monitor) -> None:
    def scraped() -> list[dict]:
        data = httpx.get(f"{monitor.url}/api/v1/targets", timeout=5).json()["data"]
        return [
            t
            for t in data["activeTargets"]
            if t["labels"].get("job") == "ray"
            and t["labels"]["instance"].endswith(f":{monitor.port}")
        ]

    assert poll(scraped, timeout_s=25), httpx.get(f"{monitor.url}/api/v1/targets").json()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stopping_monitor_stops_prometheus_and_frees_the_port(tmp_path: Path, sig: int) -> None:
    m = start_monitor(tmp_path)
    child = m.prometheus()
    assert not port_is_free(m.port)
    assert stop(m.proc, sig) == 0, m.text()
    assert not psutil.pid_exists(child.pid), f"Prometheus (pid {child.pid}) outlived the command"
    assert port_is_free(m.port)
    assert "Prometheus stopped" in m.text()


def test_prometheus_does_not_outlive_a_killed_monitor(tmp_path: Path) -> None:
    """kill -9 leaves the command no chance to stop its child: the kernel does it."""
    m = start_monitor(tmp_path)
    child = m.prometheus()
    m.proc.kill()
    m.proc.wait(timeout=10)
    try:
        child.wait(timeout=20)
    except psutil.TimeoutExpired:
        child.kill()
        pytest.fail(f"Prometheus (pid {child.pid}) kept running after its monitor was killed")
    assert poll(lambda: port_is_free(m.port), timeout_s=5)


# ---------------------------------------------------------------------------- bad input


def test_a_port_in_use_is_refused_naming_the_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_monitor("--port", str(port), env=env_for(tmp_path / "store"))
    assert result.returncode == 2, result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "pass --port" in result.stderr
    assert not (tmp_path / "store" / "prometheus").exists()  # nothing started


def test_a_second_monitor_on_the_same_storage_root_is_refused(monitor: Monitor) -> None:
    result = run_monitor("--port", str(free_port()), env=env_for(monitor.storage))
    assert result.returncode == 2, result.stderr
    assert f"another `scaledl monitor` (pid {monitor.proc.pid})" in result.stderr
    assert monitor.prometheus().is_running()


def test_a_missing_prometheus_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_monitor(env=env_for(tmp_path / "store", PATH=str(empty)))
    assert result.returncode == 2, result.stderr
    assert "not found on PATH" in result.stderr
    assert "apt-get install prometheus" in result.stderr


def test_a_rule_that_fails_promtool_stops_monitor_with_promtools_message(tmp_path: Path) -> None:
    broken = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, broken)
    alerts = broken / "rules" / "alerts.yml"
    text = alerts.read_text()
    good = 'route_version:scaledl_requests_errors:ratio_rate5m{route=~"/v1/predict|/v2/infer"}'
    assert good in text
    alerts.write_text(text.replace(good, "rate(ray_scaledl_requests_total[5m]", 1))
    result = run_monitor(
        "--port", str(free_port()), "--prometheus-dir", str(broken), env=env_for(tmp_path / "s")
    )
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())  # rich may fold the line
    assert f"rule file {alerts} fails `promtool check rules`" in message
    assert "ScaledlErrorRatioHigh" in message and "unclosed left parenthesis" in message
    assert not (tmp_path / "s" / "prometheus").exists()


# ---------------------------------------------------------------------------- dashboard


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def concrete(expr: str) -> str:
    """A panel's query as Grafana sends it with every variable at All."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        value = var.get("allValue") or var["options"][0]["value"]
        name = re.escape(var["name"])
        expr = re.sub(rf"\$\{{{name}(?::\w+)?\}}|\${name}\b", lambda _, v=value: v, expr)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def test_the_dashboard_has_the_shape_grafana_imports() -> None:
    d = dashboard()
    assert d["uid"] == "scaledl" and d["title"] and 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    ref = {"type": "prometheus", "uid": "${datasource}"}
    titles = set()
    for panel in graph_panels():
        titles.add(panel["title"])
        assert panel["datasource"] == ref, panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ref and target["expr"] and target["refId"]
    for wanted in (
        "Requests per version",
        "Error ratio per version",
        "Latency p50 and p99 per version",
        "Escalated and degraded share",
        "Shed requests",
        "Rollout step",
        "Training throughput",
        "Quarantine share",
    ):
        assert wanted in titles


def test_the_dashboard_reads_only_recorded_rules_and_documented_series() -> None:
    """A misspelt name would still evaluate (to nothing): check each name against the
    rules that record it, or the series table (and its proposals) of the Prometheus README."""
    records, _ = rule_names()
    documented = (PROMETHEUS_DIR / "README.md").read_text()
    for panel in graph_panels():
        for target in panel["targets"]:
            names = set(
                re.findall(r"(?<![\w:])[a-z_]+:[a-z0-9_]+:[a-z0-9_]+(?![\w:])", target["expr"])
            )
            assert names <= records, (panel["title"], names - records)
            raw = set(re.findall(r"(?<![\w:])(?:ray_)?scaledl_[a-z0-9_]+(?![\w:])", target["expr"]))
            assert all(f"`{n}" in documented for n in raw), (panel["title"], raw)
        if "Not exported yet" in panel.get("description", ""):
            assert "appear" in panel["description"] or "fills in" in panel["description"]


def test_every_dashboard_query_evaluates_on_the_real_prometheus(monitor: Monitor) -> None:
    for panel in graph_panels():
        for target in panel["targets"]:
            expr = concrete(target["expr"])
            answer = query(monitor, expr)
            assert answer["http"] == 200 and answer["status"] == "success", (
                panel["title"],
                expr,
                answer,
            )
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"]).groups()
        resp = httpx.get(
            f"{monitor.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=5
        )
        assert resp.status_code == 200 and resp.json()["status"] == "success", var["name"]


# ---------------------------------------------------------------------------- dashboard URL


def test_the_dashboard_url_comes_with_how_to_get_past_rays_token_prompt() -> None:
    endpoint = Endpoint("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/models/digits/predict")
    lines = url_lines(endpoint, "http://127.0.0.1:8265", None)
    at = next(i for i, line in enumerate(lines) if line.startswith("dashboard"))
    assert "`ray get-auth-token`" in lines[at + 1]
    assert not any("get-auth-token" in line for line in url_lines(endpoint, None, None))
