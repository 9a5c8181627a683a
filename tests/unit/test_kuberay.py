"""`scaledl cluster manifests`: KubeRay manifests that KubeRay's own CRD schemas accept
(vendored from ray-project/kuberay, cluster/kuberay/crds/), that carry the local Serve
config and transport, start commands that exist, and make public only what may be."""

from __future__ import annotations

import functools
import gzip
import importlib
import shlex
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import typer
import yaml
from ray.serve.schema import ServeDeploySchema

from app.errors import ConfigError
from app.kuberay import SERVE_PORT, manifests, public_paths, to_yaml
from app.runtime import FAST_TRANSPORT
from app.settings import Settings, load_settings
from app.workloads.base import TIERS
from tests.unit.test_route_audit import INFERENCE, OPEN, ROUTES, concrete
from tests.unit.test_serve_config import calibrated, config_of

CRDS = Path(__file__).parents[2] / "cluster" / "kuberay" / "crds"
SECRET = "a-cluster-key-of-16+chars"


def strict(schema: Any) -> Any:
    """The CRD's structural schema, with unknown fields refused: the API server prunes
    them silently, so a misspelled field would otherwise just vanish."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load(gzip.open(CRDS / f"ray.io_{kind.lower()}s.yaml.gz"), Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


@pytest.fixture
def settings(tmp_path: Path, clean_env: None) -> Settings:
    settings = load_settings(storage_root=tmp_path / "store", api_key=SECRET)
    calibrated(settings, cheap="3", expensive="2", threshold=0.8)
    return settings


def generated(settings: Settings, workload: str = "digits") -> dict[str, dict]:
    return manifests(settings, workload, config_of(settings), FAST_TRANSPORT, image="img:1")


def containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_manifests_validate_against_kuberays_crds(settings: Settings) -> None:
    out = generated(settings)
    assert set(out) == {
        "rayservice.yaml", "ingress.yaml", "rayjob-ingest.yaml", "rayjob-calibrate.yaml",
        "rayjob-train-cheap.yaml", "rayjob-train-expensive.yaml",
    }  # fmt: skip
    for name, manifest in out.items():
        if manifest["kind"] in ("RayService", "RayJob"):
            as_written = yaml.safe_load(to_yaml(manifest))
            errors = list(validator(manifest["kind"]).iter_errors(as_written))
            assert not errors, (name, [e.message for e in errors[:3]])
    # The check is strict: a misspelled field is refused, not pruned.
    service = yaml.safe_load(to_yaml(out["rayservice.yaml"]))
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert not validator("RayService").is_valid(service)


def test_the_service_serves_the_local_config_with_its_transport_and_fault_tolerance(
    settings: Settings,
) -> None:
    out = generated(settings)
    spec = out["rayservice.yaml"]["spec"]
    local = config_of(settings)
    serve = yaml.safe_load(spec["serveConfigV2"])
    assert serve["applications"] == local["applications"]
    assert serve["proxy_location"] == local["proxy_location"]
    # No http_options: a local host of 127.0.0.1 would be unreachable in a pod, and
    # KubeRay's serve service targets Ray's default, 0.0.0.0:8000.
    assert "http_options" not in serve and local["http_options"]["host"] == "127.0.0.1"
    defaults = ServeDeploySchema.model_validate(serve).http_options
    assert (defaults.host, defaults.port) == ("0.0.0.0", SERVE_PORT)
    (app,) = ServeDeploySchema.model_validate(serve).applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    for deployment in app.deployments:  # the autoscaling policy the tiers name exists
        policy = (deployment.autoscaling_config or {}).get("policy", {}).get("policy_function")
        if policy:
            module, _, attr = policy.partition(":")
            assert getattr(importlib.import_module(module), attr)
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "redis:6379"
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica there
    assert spec["excludeHeadPodFromServeSvc"] is True  # nor requests, through its proxy
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    (serving,) = cluster["workerGroupSpecs"]
    assert serving["maxReplicas"] == 5  # cheap 2 + expensive 2 + ingress 1, by default
    # KubeRay's cluster hash ignores min/maxReplicas: the bound rides in the template.
    assert serving["template"]["metadata"]["annotations"] == {"scaledl.io/serve-max-nodes": "5"}
    for container in [c for m in out.values() if m["kind"] != "Ingress" for c in containers(m)]:
        # KubeRay's default ports (dashboard, gcs, client, serve) come only with none
        # listed; a head without "dashboard" never gets its Serve config or a job.
        assert "ports" not in container
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in FAST_TRANSPORT} == FAST_TRANSPORT
        assert env["SCALEDL_STORAGE_ROOT"] == str(settings.storage_root)
        assert container["volumeMounts"][0]["mountPath"] == str(settings.storage_root)
    text = "".join(to_yaml(m) for m in out.values())
    assert SECRET not in text  # the key travels as its hash, in the Serve config


def test_the_ingress_makes_public_only_inference_and_health(settings: Settings) -> None:
    rules = generated(settings)["ingress.yaml"]["spec"]["rules"]
    paths = [(p["pathType"], p["path"]) for p in rules[0]["http"]["paths"]]
    assert paths == public_paths("digits")

    def public(path: str) -> bool:
        return any(
            path == p or (kind == "Prefix" and path.startswith(p.rstrip("/") + "/"))
            for kind, p in paths
        )

    for method, template in ROUTES:  # every route the app serves, read from the app
        expected = (method, template) in OPEN | INFERENCE
        assert public(concrete(template)) == expected, (method, template)
    assert not public("/docs") and not public("/openapi.json")


def test_each_stage_job_runs_a_command_that_exists_on_a_cluster_that_fits_it(
    settings: Settings,
) -> None:
    from app.cli.main import cli

    out = generated(settings)
    jobs = [name for name in out if name.startswith("rayjob-")]
    assert len(jobs) == 2 + len(TIERS)
    command_of = typer.main.get_command(cli)
    for name in jobs:
        spec = out[name]["spec"]
        command = shlex.split(spec["entrypoint"])
        assert command[:3] == ["python", "-m", "app"]
        # Parsed as the CLI will (options and their values; --help would stop early).
        group, *args = command[3:]
        sub = command_of.commands[group]
        while isinstance(sub, click.Group):
            sub = sub.commands[args.pop(0)]
        sub.make_context(name, list(args), parent=click.Context(command_of))
        if "--tier" in args:
            assert args[args.index("--tier") + 1] in TIERS
        assert (spec["submissionMode"], spec["shutdownAfterJobFinishes"]) == ("K8sJobMode", True)
        assert spec["backoffLimit"] == 0  # a rerun is a resubmission (--resume for training)
    train = out["rayjob-train-cheap.yaml"]["spec"]["rayClusterSpec"]
    (workers,) = train["workerGroupSpecs"]
    cfg = settings.train
    assert workers["replicas"] == workers["maxReplicas"] == cfg.num_workers
    assert float(workers["rayStartParams"]["num-cpus"]) >= cfg.cpus_per_worker
    assert float(train["headGroupSpec"]["rayStartParams"]["num-cpus"]) >= 1  # Ray Data


def test_a_pii_workloads_key_comes_from_a_secret_and_a_relative_root_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    from app.kuberay import manifests as build

    config = config_of(settings)
    out = build(settings, "transactions", config, {}, image="img:1")
    env = containers(out["rayjob-ingest.yaml"])[0]["env"]
    (pii,) = [e for e in env if e["name"] == "SCALEDL_PII_KEY"]
    assert pii == {
        "name": "SCALEDL_PII_KEY",
        "valueFrom": {"secretKeyRef": {"name": "scaledl-pii-key", "key": "key"}},
    }
    relative = load_settings(storage_root=Path("store"))
    with pytest.raises(ConfigError, match="must be absolute: run with SCALEDL_STORAGE_ROOT"):
        build(relative, "digits", config, {}, image="img:1")


def worker_groups(manifests: dict[str, dict]) -> dict[str, list[dict]]:
    """Each RayService's and RayJob's worker groups, by file name."""
    return {
        name: (m["spec"].get("rayClusterConfig") or m["spec"]["rayClusterSpec"])["workerGroupSpecs"]
        for name, m in manifests.items()
        if m["kind"] in ("RayService", "RayJob")
    }


def test_node_labels_the_settings_select_are_on_the_groups_that_run_that_work(
    tmp_path: Path, clean_env: None
) -> None:
    """With serve.node_labels and train.node_labels set, the serving group and each
    training job's group carry those Ray node labels: otherwise no replica or training
    worker could be placed. Without them (the default), no group has labels."""
    pools = {"train": {"node_labels": {"pool": "batch"}}, "serve": {"node_labels": {"pool": "web"}}}
    labelled = load_settings(storage_root=tmp_path / "store", api_key=SECRET, **pools)
    calibrated(labelled, cheap="3", expensive="2", threshold=0.8)
    out = generated(labelled)
    for name in worker_groups(out):
        as_written = yaml.safe_load(to_yaml(out[name]))
        errors = list(validator(out[name]["kind"]).iter_errors(as_written))
        assert not errors, (name, errors[0].message)
    groups = worker_groups(out)
    assert [g["labels"] for g in groups["rayservice.yaml"]] == [{"pool": "web"}]
    for tier in TIERS:
        assert [g["labels"] for g in groups[f"rayjob-train-{tier}.yaml"]] == [{"pool": "batch"}]
    plain = load_settings(storage_root=tmp_path / "plain", api_key=SECRET)
    calibrated(plain, cheap="3", expensive="2", threshold=0.8)
    assert not any("labels" in g for gs in worker_groups(generated(plain)).values() for g in gs)
