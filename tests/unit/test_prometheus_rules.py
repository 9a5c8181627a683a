"""cluster/prometheus/: the scrape config and the rules are what Prometheus accepts, and
the rules do what their promtool unit tests (cluster/prometheus/tests/) say."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "cluster" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not on PATH: install the distribution's Prometheus "
            "(`apt-get install prometheus`; .ci/run does it on a clean machine)"
        )
    return subprocess.run([exe, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"`{' '.join(result.args)}` exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def alerts() -> dict[str, dict]:
    rules = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.update({r["alert"]: r for r in group["rules"] if "alert" in r})
    return rules


def test_the_rule_files_pass_promtool_check() -> None:
    assert RULE_FILES, f"no rule files under {PROMETHEUS / 'rules'}"
    assert_ok(promtool("check", "rules", *(str(p) for p in RULE_FILES)))


def test_the_scrape_config_passes_promtool_check_and_loads_every_rule_file() -> None:
    """Ray's discovery file exists only while a cluster runs: promtool warns about a
    missing one and still checks the rest, the rule files included."""
    result = promtool("check", "config", "prometheus.yml")
    assert_ok(result)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout, result.stdout
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    files = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert [Path(f).name for f in files] == ["prom_metrics_service_discovery.json"]


def test_the_rules_do_what_their_promtool_tests_say() -> None:
    assert TEST_FILES, f"no promtool tests under {PROMETHEUS / 'tests'}"
    assert_ok(promtool("test", "rules", *(str(p) for p in TEST_FILES)))


def test_every_alert_has_a_runbook_and_a_test_that_fires_it_and_one_that_does_not() -> None:
    fired, quiet = set(), set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    rules = alerts()
    assert rules, "no alert rules found"
    for name, rule in rules.items():
        assert "for" in rule, f"{name} has no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "runbook"} <= set(rule["annotations"]), name
    assert set(rules) - fired == set(), "alerts with no test that fires them"
    assert set(rules) - quiet == set(), "alerts with no test where they stay quiet"
