"""The graph builder: ``build_app(GraphArgs) -> Application``.

The Serve config YAML (``import_path: serve_graphs.builder:build_app`` plus ``args``) is
the only deploy-time input; ``scaledl serve`` builds the same args from the settings.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import BackpressureConfig
from ray.serve.schema import LoggingConfig

from app.cascade_spec import load_cascade
from app.registry import Registry
from app.workloads import TIERS, get_workload
from serve_graphs.api import RETRY_AFTER_S
from serve_graphs.args import GraphArgs, TierArgs
from serve_graphs.ingress import Ingress
from serve_graphs.tier_model import TierModel

# JSON lines that carry the request id, so one request can be followed across replicas.
LOGGING = LoggingConfig(encoding="JSON").model_dump()


def build_app(args: GraphArgs | dict[str, Any]) -> Application:
    """Resolve the cascade once, here, so every replica loads exactly the same versions.

    Serve hands the config YAML's ``args`` over as a dict (it converts only when the
    annotation is a class, and ``from __future__ import annotations`` makes it a string),
    so they are validated here.
    """
    args = GraphArgs.model_validate(args)
    serve_cfg = args.serve
    workload = get_workload(args.workload)
    cascade, ref = load_cascade(Registry(args.tracking_uri), workload.name, serve_cfg.cascade_ref)
    versions = {"cheap": cascade.cheap_version, "expensive": cascade.expensive_version}
    tiers = {
        tier: TierModel.options(
            name=f"{tier}-tier",
            ray_actor_options={"num_cpus": serve_cfg.tier_num_cpus},
            max_ongoing_requests=serve_cfg.tier_max_ongoing_requests,
            max_queued_requests=serve_cfg.tier_max_queued_requests,
            user_config=serve_cfg.batch.model_dump(),
            logging_config=LOGGING,
        ).bind(
            TierArgs(
                registered_name=workload.registered_model_name(tier),
                model_ref=versions[tier],
                tracking_uri=args.tracking_uri,
            ).model_dump()
        )
        for tier in TIERS
    }
    return Ingress.options(
        ray_actor_options={"num_cpus": serve_cfg.ingress_num_cpus},
        max_ongoing_requests=serve_cfg.ingress_max_ongoing_requests,
        max_queued_requests=serve_cfg.ingress_max_queued_requests,
        # Shed load at the proxy with the same answer our own 503s give.
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        logging_config=LOGGING,
    ).bind(tiers["cheap"], tiers["expensive"], args.model_dump(), cascade.threshold, ref.version)
