"""`scaledl demo --no-keep` end to end, as a user runs it, with fewer epochs (the
``demo_run`` fixture of tests/system/conftest.py runs it once for the tier)."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from tests.system.conftest import DemoRun

pytestmark = pytest.mark.slow


def measure(output: str, name: str) -> str:
    match = re.search(rf"{re.escape(name)}\s*│\s*([^│]+?)\s*│", output)
    assert match, f"{name!r} not in the demo's report:\n{output}"
    return match.group(1)


def test_demo_trains_serves_and_reports_a_real_accuracy(demo_run: DemoRun) -> None:
    result, folder, prometheus = demo_run.result, demo_run.folder, demo_run.prometheus_port
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
    assert (folder / ".scaledl" / "mlflow.db").is_file()
    # --monitor ran Prometheus with the rules beside it, and stopped it at the end
    assert f"Prometheus http://127.0.0.1:{prometheus}" in out
    prometheus_log = folder / ".scaledl/prometheus/prometheus.log"
    assert "Loading configuration file" in prometheus_log.read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", prometheus))  # free again


def test_the_cluster_configs_are_written_from_the_demos_store(
    trained_store: Path, tmp_path: Path
) -> None:
    """`scaledl cluster launcher` and `scaledl cluster manifests`, as a user runs them
    where the registry can be read: each writes its files, and the launcher's config is
    one `ray up` takes (Ray's own checks), its serve.yaml a Serve config whose
    deployments serve the demo's cascade."""
    import subprocess

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.serve.schema import ServeDeploySchema

    from tests.system.conftest import BIN, clean_env

    env = clean_env(SCALEDL_STORAGE_ROOT=str(trained_store.resolve()),
                    SCALEDL_API_KEY="a-cluster-key-of-16+chars")  # fmt: skip
    for command, written in (
        ("launcher", {"cluster.yaml", "serve.yaml"}),
        ("manifests", {"rayservice.yaml", "ingress.yaml", "rayjob-ingest.yaml",
                       "rayjob-calibrate.yaml", "rayjob-train-cheap.yaml",
                       "rayjob-train-expensive.yaml"}),
    ):  # fmt: skip
        out = tmp_path / command
        said = subprocess.run(
            [str(BIN / "scaledl"), "cluster", command, "--workload", "digits",
             "--image", "registry.example/scaledl:1", "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert said.returncode == 0, said.stdout + said.stderr
        assert {p.name for p in out.iterdir()} == written
    validate_config(
        prepare_config(yaml.safe_load((tmp_path / "launcher/cluster.yaml").read_text()))
    )
    serve = ServeDeploySchema.model_validate(
        yaml.safe_load((tmp_path / "launcher/serve.yaml").read_text())
    )
    assert serve.applications[0].args["serve"]["node_labels"] == {"scaledl.io/pool": "serve"}
