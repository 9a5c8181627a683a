"""The Ray cluster launcher's config (`ray up`) for scaledl on a cloud's VMs (AWS),
generated from the settings `scaledl serve config` reads, as the KubeRay manifests are.

Three node types, after the article's cost advice (spot for work that may be
interrupted, on-demand for what answers users):

- ``head``: on-demand, and it runs no work (``CPU: 0``): the GCS, the dashboard, the jobs'
  drivers and the Serve controller live there, and no worker's loss touches them.
- ``batch``: spot, from zero nodes: the training workers (``train.node_labels``). Ray
  Data's tasks are not pinned: they run where there are CPUs (not on the head). A
  preempted node is a killed worker: training resumes from its latest
  checkpoint (``train.max_failures``), an ingest runs the lost tasks again
  (``tests/integration/test_transactions.py``), and a stopped job continues with
  ``scaledl train --resume``.
- ``serve``: on-demand, sized from the deployments' replica bounds: every Serve replica
  (``serve.node_labels``).

The pools are Ray node labels (:data:`POOL`). The settings that select them are
exported on every node, with the storage root and the transport variables: every
process of the cluster, a job's driver as well as a replica, starts with them.
"""

from __future__ import annotations

import json
import math
import shlex
from typing import Any

from app.errors import ConfigError
from app.kuberay import require_shared_root
from app.settings import Settings

POOL = "scaledl.io/pool"
BATCH = {POOL: "batch"}  # spot: training and batch work
SERVE = {POOL: "serve"}  # on-demand: the Serve replicas
GCS_PORT = 6379


def pool_settings() -> dict[str, dict[str, Any]]:
    """The settings overrides that put work on the launcher's pools: what
    :func:`launcher_config` needs the settings (and their Serve config) built with."""
    return {"train": {"node_labels": BATCH}, "serve": {"node_labels": SERVE}}


def launcher_config(
    settings: Settings,
    serve_config: dict[str, Any],
    transport: dict[str, str],
    *,
    image: str,
    cluster_name: str = "scaledl",
    region: str = "us-west-2",
    head_type: str = "m5.large",
    batch_type: str = "c5.2xlarge",
    serve_type: str = "c5.xlarge",
    batch_max_nodes: int = 4,
) -> dict[str, Any]:
    """The launcher's YAML as a dict. ``settings`` must select the pools
    (:func:`pool_settings`) and ``serve_config`` be what `scaledl serve config` builds
    from them; ``transport``: its variables (``app.runtime.transport_env``); ``image``:
    a container image with this repository installed (``pip install .``)."""
    if settings.train.node_labels != BATCH or settings.serve.node_labels != SERVE:
        raise ConfigError(
            f"the cluster launcher's pools need train.node_labels={BATCH} and "
            f"serve.node_labels={SERVE}; got {settings.train.node_labels} and "
            f"{settings.serve.node_labels}: build the settings with pool_settings()"
        )
    require_shared_root(settings, "every node mounts the shared file system (EFS, say)")
    train = settings.train
    if train.cpus_per_worker > _instance_cpus(batch_type):
        raise ConfigError(
            f"train.cpus_per_worker={train.cpus_per_worker:g} does not fit a {batch_type} "
            f"({_instance_cpus(batch_type)} vCPUs): pick a larger --batch-type"
        )
    least, most = _serve_cpus(serve_config, settings)
    serve_node_cpus = _instance_cpus(serve_type)
    env = {
        "RAY_AUTH_MODE": "token",  # every node joins with the token file mounted below
        "SCALEDL_STORAGE_ROOT": str(settings.storage_root),
        "SCALEDL_TRAIN__NODE_LABELS": _json(BATCH),
        "SCALEDL_SERVE__NODE_LABELS": _json(SERVE),
        **transport,
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return {
        "cluster_name": cluster_name,
        "max_workers": batch_max_nodes + math.ceil(most / serve_node_cpus),
        "idle_timeout_minutes": 5,
        "provider": {"type": "aws", "region": region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {"image": image, "container_name": "scaledl", "pull_before_run": True},
        # Ray's token (`ray start --head` writes ~/.ray/auth_token on the machine you
        # launch from): one token for every node, the CLI and `ray job submit`.
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {
                "node_config": {"InstanceType": head_type},
                "resources": {"CPU": 0},
                "min_workers": 0,
                "max_workers": 0,
            },
            "batch": {
                "node_config": {
                    "InstanceType": batch_type,
                    "InstanceMarketOptions": {"MarketType": "spot"},
                },
                "resources": {"CPU": _instance_cpus(batch_type)},
                "labels": dict(BATCH),
                "min_workers": 0,
                "max_workers": max(batch_max_nodes, train.num_workers),
            },
            "serve": {
                "node_config": {"InstanceType": serve_type},
                "resources": {"CPU": serve_node_cpus},
                "labels": dict(SERVE),
                "min_workers": max(1, math.ceil(least / serve_node_cpus)),
                "max_workers": max(1, math.ceil(most / serve_node_cpus)),
            },
        },
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; env {exports} ray start --head --port={GCS_PORT} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; env {exports} ray start --address=$RAY_HEAD_IP:{GCS_PORT} "
            "--disable-usage-stats",
        ],
    }


def _serve_cpus(serve_config: dict[str, Any], settings: Settings) -> tuple[float, float]:
    """The CPUs the application's replicas reserve at their fewest and at their most."""
    from serve_graphs.builder import INGRESS

    least = most = 0.0
    for deployment in serve_config["applications"][0]["deployments"]:
        bounds = deployment.get("autoscaling_config", {})
        cpus = (
            settings.serve.ingress_num_cpus
            if deployment["name"] == INGRESS
            else settings.serve.tier_num_cpus
        )
        least += cpus * bounds.get("min_replicas", 1)
        most += cpus * bounds.get("max_replicas", 1)
    return least, most


_SIZES = {"large": 2, "xlarge": 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32}


def _instance_cpus(instance_type: str) -> int:
    """vCPUs of an AWS instance type from its size (m5.2xlarge: 8)."""
    size = instance_type.rsplit(".", 1)[-1]
    if size not in _SIZES:
        raise ConfigError(f"unknown instance size {instance_type!r}: use one of {list(_SIZES)}")
    return _SIZES[size]


def _json(labels: dict[str, str]) -> str:
    return json.dumps(labels, separators=(",", ":"))
