"""Ingress: the HTTP entry (FastAPI) with auth, validation and the cascade inside it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from app.errors import ServiceUnavailable
from app.keys import KeyRing
from app.workloads import get_workload
from serve_graphs.api import build_api
from serve_graphs.args import GraphArgs, IngressConfig
from serve_graphs.cascade import (
    Cascade,
    CircuitBreaker,
    Instances,
    Prediction,
    TierAnswer,
    TierFn,
)
from serve_graphs.observe import CostMeter

log = logging.getLogger("ray.serve")


class TierFailed(ServiceUnavailable):
    """A tier call that failed (a replica died mid-call), as opposed to one refused for
    load: worth one more try, since a prediction is idempotent."""


TIER_ATTEMPTS = 2  # one retry: a dead replica is replaced, its callers go elsewhere


def tier_fn(handle: DeploymentHandle, tier: str, *, retry_wait_s: float = 0.05) -> TierFn:
    """A tier as the cascade sees it; a tier that cannot answer is a 503, never a 500.

    A failed call is retried once after ``retry_wait_s`` (tenacity): predictions are
    idempotent. A call refused for load is not retried: that would add to the load.
    """

    async def attempt(instances: Instances) -> TierAnswer:
        try:
            probs, version = await handle.predict.remote(instances)
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {tier} tier is at capacity: retry shortly") from exc
        except (RayServeException, RayError) as exc:  # a dead replica, a failed model call
            log.warning("the %s tier failed: %s", tier, exc)
            raise TierFailed(
                f"the {tier} tier could not answer ({type(exc).__name__}): retry shortly"
            ) from exc
        return TierAnswer(probs, version)

    async def call(instances: Instances) -> TierAnswer:
        async for attempt_ in AsyncRetrying(
            retry=retry_if_exception_type(TierFailed),
            stop=stop_after_attempt(TIER_ATTEMPTS),
            wait=wait_fixed(retry_wait_s),
            reraise=True,
        ):
            with attempt_:
                return await attempt(instances)
        raise AssertionError("unreachable: tenacity reraises the last failure")

    return call


LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000]


class ServeMetrics:
    """The Observer of a replica: Ray Serve metrics, exported to Prometheus by Ray as
    ``ray_<name>`` (counters gain ``_total``, histograms ``_bucket``/``_sum``/``_count``)."""

    def __init__(self, cascade_version: Callable[[], str]) -> None:
        self.cascade_version = cascade_version
        self.requests = metrics.Counter(
            "scaledl_requests",
            description="HTTP requests by route, status and served cascade version.",
            tag_keys=("route", "status", "cascade_version"),
        )
        self.latency = metrics.Histogram(
            "scaledl_request_latency_ms",
            description="HTTP request latency by route and served cascade version.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "cascade_version"),
        )
        self.answered = metrics.Counter(
            "scaledl_predictions",
            description="Instances answered, by tier and model version, and whether the "
            "answer was degraded: the expensive-tier share and A/B comparisons come from it.",
            tag_keys=("tier", "model_version", "degraded"),
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        version = self.cascade_version()
        self.requests.inc(tags={"route": route, "status": str(status), "cascade_version": version})
        self.latency.observe(seconds * 1000, tags={"route": route, "cascade_version": version})

    def predictions(self, predictions: list[Prediction]) -> None:
        counts = Counter((p.tier, p.model_version, p.degraded) for p in predictions)
        for (tier, version, degraded), n in counts.items():
            tags = {"tier": tier, "model_version": version, "degraded": str(degraded).lower()}
            self.answered.inc(n, tags=tags)


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
            "scaledl_cascade_degraded",
            description="Instances answered by the cheap tier because the expensive tier "
            "was slow, failing or behind an open breaker.",
            tag_keys=("reason",),
        )
        self.costs = CostMeter()
        self.cascade = Cascade(
            tier_fn(cheap, "cheap"),
            tier_fn(expensive, "expensive"),
            threshold=1.0,  # until reconfigure, which Serve calls before the first request
            expensive_timeout_s=cfg.expensive_timeout_s,
            breaker=CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s),
            on_degraded=lambda n, reason: degraded.inc(n, tags={"reason": reason}),
            on_tier_call=self.costs.tier_call,
        )

    def reconfigure(self, user_config: dict) -> None:
        cfg = IngressConfig.model_validate(user_config)
        self.cascade.calibrated(cfg.cheap_version, cfg.threshold)
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
            observer=ServeMetrics(lambda: self.cascade_version),
            costs=self.costs,
            model_version=lambda: self.cascade_version,
        )
