"""The graph builder: ``build_app(GraphArgs) -> Application``.

The Serve config YAML (``import_path: serve_graphs.builder:build_app``, ``args``, and
each deployment's ``user_config`` and ``autoscaling_config``) is the deploy-time input;
``scaledl serve`` deploys the same config, generated from the settings. Built from args
alone (``serve.run``, or a config without the deployments section), the app resolves the
``champion`` cascade and the settings' defaults for the rest.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.schema import LoggingConfig

from app.registry import Registry
from app.workloads import TIERS, Workload, get_workload
from serve_graphs.api.app import RETRY_AFTER_S
from serve_graphs.args import GraphArgs, IngressConfig, TierConfig
from serve_graphs.catalog import cascade_models
from serve_graphs.ingress import Ingress
from serve_graphs.scaling import POLICY
from serve_graphs.tier_model import TierModel

# JSON lines that carry the request id, so one request can be followed across replicas.
LOGGING = LoggingConfig(encoding="JSON").model_dump()
# The ingress writes its own access log line (serve_graphs/api/observe.py AccessLog),
# with the version and tier that answered: Serve's would be a second line per request.
INGRESS_LOGGING = LoggingConfig(encoding="JSON", enable_access_log=False).model_dump()


INGRESS = "Ingress"
# Reach the deployments as their user_config and autoscaling_config, applied in place.
SWAPPABLE = {
    "cascade_ref",
    "int8_tiers",
    "batch",
    "cheap_replicas",
    "expensive_replicas",
    "ingress_replicas",
    "faults",
}
# (The routing table is not deployed at all: it lives in the registry, see catalog.py.)
# The settings the cheap tier's escalation reads; only these reach it, so a change to
# another (an ingress limit, say) does not restart the tiers.
ESCALATION = {
    "expensive_timeout_s",
    "breaker_failures",
    "breaker_reset_s",
    "tier_calls_in_flight",
    "tier_max_waiting_rows",
}


def tier_deployment(tier: str) -> str:
    return f"{tier}-tier"


def placement(num_cpus: float, node_labels: dict[str, str]) -> dict[str, Any]:
    """A replica's ``ray_actor_options``: its CPUs, and the node labels it needs
    (serve.node_labels: the serving pool of a cluster), if any."""
    return {"num_cpus": num_cpus, **({"label_selector": node_labels} if node_labels else {})}


def build_app(args: GraphArgs | dict[str, Any]) -> Application:
    """The graph: an ingress and one deployment per tier; the ingress calls the cheap
    tier, which calls the expensive tier for the rows it is unsure of.

    Serve hands the config YAML's ``args`` over as a dict (it converts only when the
    annotation is a class, and ``from __future__ import annotations`` makes it a string),
    so they are validated here. Which versions serve (the cascade, INT8 twins) and the
    batching are each deployment's ``user_config`` (:func:`user_configs`), resolved once
    per deploy so every replica loads the same versions. The generated Serve config
    carries them in its deployments section, which overrides what is resolved here; a
    change to them alone is applied in place.
    """
    args = GraphArgs.model_validate(args)
    serve_cfg = args.serve
    configs = user_configs(args)
    tier = {
        t: TierModel.options(
            name=tier_deployment(t),
            ray_actor_options=placement(serve_cfg.tier_num_cpus, serve_cfg.node_labels),
            max_ongoing_requests=serve_cfg.tier_max_ongoing_requests,
            max_queued_requests=serve_cfg.tier_max_queued_requests,
            user_config=configs[tier_deployment(t)],
            autoscaling_config=scaling(args)[tier_deployment(t)],
            logging_config=LOGGING,
        )
        for t in TIERS
    }
    expensive = tier["expensive"].bind(args.tracking_uri)
    # The cheap tier escalates to the expensive one itself (serve_graphs/decide/cascade.py).
    escalation = args.serve.model_dump(mode="json", include=ESCALATION)
    cheap = tier["cheap"].bind(args.tracking_uri, expensive, escalation)
    return Ingress.options(
        name=INGRESS,
        ray_actor_options=placement(serve_cfg.ingress_num_cpus, serve_cfg.node_labels),
        max_ongoing_requests=serve_cfg.ingress_max_ongoing_requests,
        max_queued_requests=serve_cfg.ingress_max_queued_requests,
        # Shed load at the proxy with the same answer our own 503s give.
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        logging_config=INGRESS_LOGGING,
        user_config=configs[INGRESS],
        autoscaling_config=scaling(args)[INGRESS],
    ).bind(cheap, expensive, stable_args(args))


def stable_args(args: GraphArgs) -> dict[str, Any]:
    """The args without what travels as user_config: the same for every model swap."""
    return args.model_dump(mode="json", exclude={"serve": SWAPPABLE})


def scaling(args: GraphArgs) -> dict[str, dict[str, Any]]:
    """Deployment name -> its Serve autoscaling_config. Tiers scale on how busy their
    replicas are (serve_graphs/scaling.py), the ingress on its HTTP requests in flight."""
    configs = {INGRESS: args.serve.ingress_replicas.autoscaling_config()}
    for tier in TIERS:
        settings = getattr(args.serve, f"{tier}_replicas")
        policy = {"policy_function": POLICY, "policy_kwargs": {"target_busy": settings.target_busy}}
        configs[tier_deployment(tier)] = {**settings.autoscaling_config(), "policy": policy}
    return configs


def user_configs(args: GraphArgs) -> dict[str, dict[str, Any]]:
    """Deployment name -> user_config: the pinned cascade, its tiers (or their INT8
    twins) and batching, resolved from the registry now."""
    serve_cfg = args.serve
    registry = Registry(args.tracking_uri)
    workload = get_workload(args.workload)
    models = cascade_models(registry, workload, serve_cfg.cascade_ref, serve_cfg.int8_tiers)
    configs = {
        tier_deployment(tier): TierConfig(
            model=models.tiers[tier], batch=serve_cfg.batch
        ).model_dump(mode="json")
        for tier in TIERS
    }
    configs[INGRESS] = IngressConfig(
        threshold=models.spec.threshold,
        cascade_version=models.ref.version,
        cheap_version=models.tiers["cheap"].model_id,
        int8_tiers=list(serve_cfg.int8_tiers),
        max_batch_size=serve_cfg.batch.max_batch_size,
        cold_start_tiers=[
            t for t in TIERS if getattr(serve_cfg, f"{t}_replicas").min_replicas == 0
        ],
        faults=serve_cfg.faults,
    ).model_dump(mode="json")
    return configs


def promoted_user_configs(
    registry: Registry, workload: Workload, version: str, deployed: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The user_configs that serve cascade ``version`` in place of the deployed ones
    (deployment name -> user_config): the same batching, INT8 tiers, faults and cold
    starts, only the versions and the threshold change. A rollout's promotion deploys
    them; Serve applies them with ``reconfigure``, as a redeploy after calibration."""
    ingress = IngressConfig.model_validate(deployed[INGRESS])
    models = cascade_models(registry, workload, version, ingress.int8_tiers)
    configs = {
        tier_deployment(tier): TierConfig.model_validate(deployed[tier_deployment(tier)])
        .model_copy(update={"model": models.tiers[tier]})
        .model_dump(mode="json")
        for tier in TIERS
    }
    configs[INGRESS] = ingress.model_copy(
        update={
            "threshold": models.spec.threshold,
            "cascade_version": models.ref.version,
            "cheap_version": models.tiers["cheap"].model_id,
        }
    ).model_dump(mode="json")
    return configs
