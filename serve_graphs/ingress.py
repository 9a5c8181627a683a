"""Ingress: the HTTP entry (FastAPI) with auth, validation and the cascade inside it."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from app.errors import ServiceUnavailable
from app.keys import KeyRing
from app.workloads import get_workload
from serve_graphs.api import build_api
from serve_graphs.args import GraphArgs, IngressConfig
from serve_graphs.cascade import Cascade, CircuitBreaker, Instances, TierAnswer, TierFn

log = logging.getLogger("ray.serve")


def tier_fn(handle: DeploymentHandle, tier: str) -> TierFn:
    """A tier as the cascade sees it; a tier that cannot answer is a 503, never a 500."""

    async def call(instances: Instances) -> TierAnswer:
        try:
            probs, version = await handle.predict.remote(instances)
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {tier} tier is at capacity: retry shortly") from exc
        except (RayServeException, RayError) as exc:  # a dead replica, a failed model call
            log.exception("the %s tier failed", tier)
            raise ServiceUnavailable(
                f"the {tier} tier could not answer ({type(exc).__name__}): retry shortly"
            ) from exc
        return TierAnswer(probs, version)

    return call


@serve.deployment
@serve.ingress()
class Ingress:
    """The cascade's threshold and version come with ``user_config`` (IngressConfig), so
    a newly calibrated cascade is swapped in place together with its tiers."""

    def __init__(self, cheap: DeploymentHandle, expensive: DeploymentHandle, args: dict) -> None:
        self.args = GraphArgs.model_validate(args)
        self.cascade_version = ""
        cfg = self.args.serve
        degraded = metrics.Counter(
            "scaledl_cascade_degraded_total",
            description="Instances answered by the cheap tier because the expensive tier "
            "was slow, failing or behind an open breaker.",
            tag_keys=("reason",),
        )
        self.cascade = Cascade(
            tier_fn(cheap, "cheap"),
            tier_fn(expensive, "expensive"),
            threshold=1.0,  # until reconfigure, which Serve calls before the first request
            expensive_timeout_s=cfg.expensive_timeout_s,
            breaker=CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s),
            on_degraded=lambda n, reason: degraded.inc(n, tags={"reason": reason}),
        )

    def reconfigure(self, user_config: dict) -> None:
        cfg = IngressConfig.model_validate(user_config)
        self.cascade.threshold = cfg.threshold
        self.cascade_version = cfg.cascade_version
        log.info("cascade %s, threshold %.4f", cfg.cascade_version, cfg.threshold)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(
            get_workload(self.args.workload),
            self.cascade,
            keys=KeyRing(self.args.api_keys),
            max_instances=self.args.serve.max_instances_per_request,
            max_body_bytes=self.args.serve.max_body_bytes,
            request_timeout_s=self.args.serve.request_timeout_s,
            model_version=lambda: self.cascade_version,
        )
