"""KubeRay manifests, generated from the settings `scaledl serve config` reads.

`scaledl cluster manifests --workload digits --image IMAGE --out DIR` writes:

- ``rayservice.yaml``: a ``RayService`` whose ``serveConfigV2`` is exactly what
  `scaledl serve config` prints, on a cluster with Ray's autoscaler on, GCS fault
  tolerance through Redis, Ray's token auth, a head that runs no replicas (its
  dashboard internal), a ``serve`` worker group sized from the deployments' replica
  bounds, and the transport variables (serve.fast_transport) on every pod, since every
  Ray process reads them as it starts. A change to the Serve config alone is applied in
  place; a change to the cluster brings up a new one and moves traffic when it serves
  (``upgradeStrategy: NewCluster``).
- ``ingress.yaml``: the only public entry, a Kubernetes ``Ingress`` to the service's
  inference and health routes (:data:`PUBLIC_PATHS`). The admin routes (routing,
  rollouts), the API docs and the Ray dashboard stay inside the cluster.
- ``rayjob-ingest.yaml``, ``rayjob-train-<tier>.yaml``, ``rayjob-calibrate.yaml``: each
  stage as a ``RayJob`` on a cluster of its own, deleted when it finishes; the training
  cluster has one worker pod per training worker (train.num_workers x
  train.cpus_per_worker), as the trainer checks.

Every pod mounts one ReadWriteMany volume (``--volume-claim``) at the storage root,
so the stages and the service share datasets, runs, the registry and the keys file, as
they do on one machine. The image must hold this repository and its installed
dependencies (``pip install .``).
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from app.errors import ConfigError
from app.settings import Settings
from app.workloads import get_workload
from app.workloads.base import TIERS
from train.run import SPARE_CPUS_FOR_DATA

API_VERSION = "ray.io/v1"
SERVE_PORT = 8000  # the port KubeRay's serve service targets (the containers' "serve")
VOLUME = "store"


def require_shared_root(settings: Settings, mounts: str) -> None:
    """A cluster's nodes share the storage root by mounting one file system there, so it
    must be an absolute path; ``mounts`` says what mounts it, for the error."""
    if not settings.storage_root.is_absolute():
        raise ConfigError(
            f"storage_root {str(settings.storage_root)!r} is relative; {mounts} at the "
            "storage root, so it must be absolute: run with SCALEDL_STORAGE_ROOT=/data/scaledl "
            "(say), where this command can read the registry too"
        )


def public_paths(workload: str) -> list[tuple[str, str]]:
    """(pathType, path) of the routes the Ingress makes public: inference and health.
    Everything else the app serves (routes, rollouts, docs) stays internal."""
    v1, v2 = f"/v1/models/{workload}", f"/v2/models/{workload}"
    return [
        ("Exact", "/healthz"),
        ("Prefix", "/v2/health"),
        ("Exact", "/v2"),
        ("Exact", f"{v1}/predict"),
        ("Prefix", f"{v1}/versions"),  # only /versions/{version}/predict lives there
        ("Exact", v2),
        ("Exact", f"{v2}/ready"),
        ("Exact", f"{v2}/infer"),
        ("Prefix", f"{v2}/versions"),  # a version's metadata, readiness and infer
    ]


def manifests(
    settings: Settings,
    workload_name: str,
    serve_config: dict[str, Any],
    transport: dict[str, str],
    *,
    image: str,
    volume_claim: str = "scaledl-store",
    redis_address: str = "redis:6379",
    redis_secret: str = "redis-password-secret",
    host: str | None = None,
    ingress_class: str | None = None,
    ray_version: str | None = None,
    worker_cpus: int = 4,
    worker_memory: str = "8Gi",
) -> dict[str, dict[str, Any]]:
    """File name -> manifest. ``serve_config``: what `scaledl serve config` builds for
    these settings; ``transport``: its variables (``app.runtime.transport_env``);
    ``ray_version``: the image's Ray (default: this one's)."""
    import ray

    require_shared_root(settings, "every pod mounts the shared volume")
    workload = get_workload(workload_name)
    version = ray_version or ray.__version__
    pods = _Pods(settings, image, volume_claim, transport, workload.has_pii, version)
    name = f"scaledl-{workload.name}"
    out = {
        "rayservice.yaml": _ray_service(
            pods,
            name,
            serve_config,
            redis_address,
            redis_secret,
            worker_cpus,
            worker_memory,
            settings.serve.node_labels,
        ),
        "ingress.yaml": _ingress(name, workload.name, host, ingress_class),
        "rayjob-ingest.yaml": pods.job(
            f"{name}-ingest", f"python -m app data ingest --workload {workload.name}", 0, 1
        ),
        "rayjob-calibrate.yaml": pods.job(
            f"{name}-calibrate",
            f"python -m app calibrate --workload {workload.name} --promote",
            0,
            1,
        ),
    }
    cfg = settings.train
    for tier in TIERS:
        out[f"rayjob-train-{tier}.yaml"] = pods.job(
            f"{name}-train-{tier}",
            f"python -m app train --workload {workload.name} --tier {tier}",
            cfg.num_workers,
            cfg.cpus_per_worker,
            cfg.node_labels,
        )
    return out


class _Plain(yaml.SafeDumper):
    """Every value written out where it is used (no anchors and aliases), and a
    multi-line string (serveConfigV2) as the YAML block it is."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Plain.add_representer(str, _text)


def to_yaml(
    manifest: dict[str, Any],
    command: str = "scaledl cluster manifests",
    apply: str = "kubectl apply -f <this file>",
) -> str:
    header = (
        f"# Generated by `{command}` from the settings `scaledl serve config`\n"
        f"# reads; regenerate rather than edit ({apply}).\n"
    )
    return header + yaml.dump(manifest, Dumper=_Plain, sort_keys=False, width=100)


class _Pods:
    """What every pod of every cluster shares: the image, the volume at the storage
    root, the settings' environment and the transport variables."""

    def __init__(
        self,
        settings: Settings,
        image: str,
        claim: str,
        transport: dict[str, str],
        has_pii: bool,
        ray_version: str,
    ) -> None:
        self.image, self.claim, self.ray_version = image, claim, ray_version
        self.root = str(settings.storage_root)
        env: list[dict[str, Any]] = [{"name": "SCALEDL_STORAGE_ROOT", "value": self.root}]
        env += [{"name": k, "value": v} for k, v in sorted(transport.items())]
        if has_pii:  # the ingest's pseudonym key, from a Secret, never in a manifest
            secret = {"secretKeyRef": {"name": "scaledl-pii-key", "key": "key"}}
            env.append({"name": "SCALEDL_PII_KEY", "valueFrom": secret})
        self.env = env

    def template(
        self, container: str, cpus: float, memory: str, annotations: dict[str, str] | None = None
    ) -> dict[str, Any]:
        quantity = {"cpu": _cpu(cpus), "memory": memory}
        return {
            **({"metadata": {"annotations": annotations}} if annotations else {}),
            "spec": {
                "containers": [
                    {
                        "name": container,
                        "image": self.image,
                        "env": self.env,
                        "resources": {"requests": quantity, "limits": quantity},
                        # No ports: KubeRay then gives every container its defaults (gcs,
                        # dashboard, client, serve 8000). Listing only some would leave
                        # the head service without the dashboard port that KubeRay
                        # submits jobs and the Serve config through.
                        "volumeMounts": [{"name": VOLUME, "mountPath": self.root}],
                    }
                ],
                "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": self.claim}}],
            },
        }

    def cluster(self, head_cpus: float, workers: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "rayVersion": self.ray_version,
            "authOptions": {"mode": "token"},  # Ray's token auth on the cluster APIs
            "headGroupSpec": {
                # The head schedules no replica and no training worker: losing its pod
                # loses the GCS, not capacity. Its dashboard stays on a ClusterIP service.
                "rayStartParams": {"num-cpus": _ray_cpus(head_cpus)},
                "template": self.template("ray-head", max(1.0, head_cpus), "4Gi"),
            },
            "workerGroupSpecs": workers,
        }

    def job(
        self,
        name: str,
        entrypoint: str,
        workers: int,
        cpus: float,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A stage on a cluster of its own, deleted once it finishes. Training gets one
        worker pod per training worker; the head keeps SPARE_CPUS_FOR_DATA for Ray Data.
        Its failures are the job's (``backoffLimit: 0``): a rerun is a resubmission,
        `scaledl train --resume` for training."""
        groups = (
            [
                {
                    "groupName": "train",
                    "replicas": workers,
                    "minReplicas": workers,
                    "maxReplicas": workers,
                    "rayStartParams": {"num-cpus": _ray_cpus(cpus)},
                    **_labels(labels),
                    "template": self.template("ray-worker", cpus, "8Gi"),
                }
            ]
            if workers
            else []
        )
        head_cpus = SPARE_CPUS_FOR_DATA if workers else max(2.0, cpus)
        return {
            "apiVersion": API_VERSION,
            "kind": "RayJob",
            "metadata": {"name": name},
            "spec": {
                "entrypoint": entrypoint,
                "submissionMode": "K8sJobMode",
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 600,
                "backoffLimit": 0,
                "rayClusterSpec": self.cluster(head_cpus, groups),
            },
        }


def _ray_service(
    pods: _Pods,
    name: str,
    serve_config: dict[str, Any],
    redis_address: str,
    redis_secret: str,
    worker_cpus: int,
    worker_memory: str,
    labels: dict[str, str],
) -> dict[str, Any]:
    deployments = serve_config["applications"][0]["deployments"]
    most = sum(d.get("autoscaling_config", {}).get("max_replicas", 1) for d in deployments)
    serve_group = {
        "groupName": "serve",
        "replicas": 1,
        "minReplicas": 1,
        # One node per replica at most: the autoscaler adds nodes as Serve adds replicas.
        "maxReplicas": max(1, most),
        "rayStartParams": {"num-cpus": str(worker_cpus)},
        **_labels(labels),
        # KubeRay leaves min/maxReplicas out of the hash that decides whether a changed
        # RayService needs a new cluster, so new bounds alone would never reach the
        # running autoscaler: carried in the pod template too, they do.
        "template": pods.template(
            "ray-worker", worker_cpus, worker_memory, {"scaledl.io/serve-max-nodes": str(most)}
        ),
    }
    cluster = pods.cluster(0, [serve_group])
    cluster["enableInTreeAutoscaling"] = True
    cluster["gcsFaultToleranceOptions"] = {
        "redisAddress": redis_address,
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": redis_secret, "key": "password"}}},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(
                {k: v for k, v in serve_config.items() if k != "http_options"}, sort_keys=False
            ),
            "upgradeStrategy": {"type": "NewCluster"},
            # Serve starts a proxy on the head too (where its controller runs); requests
            # go to the serve workers, not through the pod that holds the GCS.
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": cluster,
        },
    }


def _ingress(
    name: str, workload: str, host: str | None, ingress_class: str | None
) -> dict[str, Any]:
    backend = {"service": {"name": f"{name}-serve-svc", "port": {"number": SERVE_PORT}}}
    rule: dict[str, Any] = {
        "http": {
            "paths": [
                {"path": path, "pathType": kind, "backend": backend}
                for kind, path in public_paths(workload)
            ]
        }
    }
    if host:
        rule = {"host": host, **rule}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": f"{name}-public"},
        "spec": {**({"ingressClassName": ingress_class} if ingress_class else {}), "rules": [rule]},
    }


def _labels(labels: dict[str, str] | None) -> dict[str, Any]:
    """A worker group's Ray node labels (KubeRay's ``labels``), which serve.node_labels
    or train.node_labels select: without them, the work they place would never start."""
    return {"labels": dict(labels)} if labels else {}


def _cpu(cpus: float) -> str:
    """A CPU quantity as Kubernetes takes it: whole, or in millicores."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def _ray_cpus(cpus: float) -> str:
    """A node's logical CPUs for `ray start --num-cpus`, which takes whole ones."""
    return str(math.ceil(cpus))
