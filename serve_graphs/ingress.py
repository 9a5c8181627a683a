"""Ingress: the HTTP entry (FastAPI) with auth, validation and routing; the cheap tier
runs the cascade it routes to."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter

from fastapi import FastAPI
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from app.keys import KeyRing
from app.registry import Registry
from app.workloads import get_workload
from serve_graphs.api import build_api
from serve_graphs.args import GraphArgs, IngressConfig
from serve_graphs.cascade import Prediction
from serve_graphs.catalog import CascadeModels, RegistryRouteStore, cascade_models
from serve_graphs.coalesce import Coalescer
from serve_graphs.escalate import CascadeFn, CascadeRoute, RemoteCascade, RoutedCascade
from serve_graphs.observe import CostMeter
from serve_graphs.routing import Routing
from serve_graphs.tier_calls import cascade_fn, watch_replicas

log = logging.getLogger("ray.serve")

ROUTES_READ_TIMEOUT_S = 10  # a slow registry must not hold a replica's start for long


# Young-generation collections every 50,000 allocations instead of Python's 700: a
# request allocates hundreds of short-lived objects, so the default collected on nearly
# every request. Measured with bench/serve.py (d+t, 64 connections, 30 s, two runs each):
# 965 and 970 req/s at (700, 20, 100), 1,063 and 1,042 at these thresholds.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """The request-serving process's collector thresholds (:data:`GC_THRESHOLDS`)."""
    gc.set_threshold(*GC_THRESHOLDS)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a worker thread
        return None


def request_id() -> str:
    """The id of the request being served (Serve's request context; private in 2.60)."""
    return serve.context._get_serve_request_context().request_id


LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000]


class ServeMetrics:
    """The Observer of a replica: Ray Serve metrics, exported to Prometheus by Ray as
    ``ray_<name>`` (counters gain ``_total``, histograms ``_bucket``/``_sum``/``_count``)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "scaledl_requests",
            description="HTTP requests by route, status and the cascade version that "
            "answered (none: no version did, e.g. a 4xx): A/B results per version.",
            tag_keys=("route", "status", "cascade_version"),
        )
        self.latency = metrics.Histogram(
            "scaledl_request_latency_ms",
            description="HTTP request latency by route and the cascade version that answered.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "cascade_version"),
        )
        self.answered = metrics.Counter(
            "scaledl_predictions",
            description="Instances answered, by tier and model version, and whether the "
            "answer was degraded: the expensive-tier share and A/B comparisons come from it.",
            tag_keys=("tier", "model_version", "degraded"),
        )

        self.shadowed = metrics.Counter(
            "scaledl_shadow_instances",
            description="Instances mirrored to a shadow version, by primary and shadow "
            "version and whether the shadow's label agreed (failed: the copy got no answer).",
            tag_keys=("cascade_version", "shadow_version", "outcome"),
        )

    def request(self, route: str, status: int, seconds: float, version: str) -> None:
        tags = {"route": route, "cascade_version": version}
        self.requests.inc(tags={**tags, "status": str(status)})
        self.latency.observe(seconds * 1000, tags=tags)

    def predictions(self, predictions: list[Prediction]) -> None:
        counts = Counter((p.tier, p.model_version, p.degraded) for p in predictions)
        for (tier, version, degraded), n in counts.items():
            tags = {"tier": tier, "model_version": version, "degraded": str(degraded).lower()}
            self.answered.inc(n, tags=tags)

    def shadow(self, primary, shadow, answer, mirrored, seconds) -> None:  # noqa: ANN001
        tags = {"cascade_version": primary, "shadow_version": shadow}
        if mirrored is None:
            self.shadowed.inc(len(answer), tags={**tags, "outcome": "failed"})
            return
        agreed = sum(a.label == m.label for a, m in zip(answer, mirrored, strict=True))
        for outcome, n in (("agree", agreed), ("disagree", len(answer) - agreed)):
            if n:
                self.shadowed.inc(n, tags={**tags, "outcome": outcome})


@serve.deployment
@serve.ingress()
class Ingress:
    """The cascade's threshold and version come with ``user_config`` (IngressConfig), so
    a newly calibrated cascade is swapped in place together with its tiers. Other
    cascade versions (A/B, canary, shadow) come from the routing table in the registry,
    which every replica watches. The cheap tier runs the cascade (serve_graphs/
    escalate.py): one call per request, whichever tier answers it."""

    def __init__(self, cheap: DeploymentHandle, expensive: DeploymentHandle, args: dict) -> None:
        tune_gc()
        self.args = GraphArgs.model_validate(args)
        self.config: IngressConfig | None = None
        self.handles = {"cheap": cheap, "expensive": expensive}
        cfg = self.args.serve
        degraded = metrics.Counter(
            "scaledl_cascade_degraded",
            description="Instances answered by the cheap tier because the expensive tier "
            "was slow, failing or behind an open breaker.",
            tag_keys=("reason",),
        )
        self.costs = CostMeter()
        self.cascade = RemoteCascade(
            on_degraded=lambda n, reason: degraded.inc(n, tags={"reason": reason}),
            on_tier_call=self.costs.tier_call,
        )
        self.cascade.call = self.coalesced(cascade_fn(cheap, self.cascade.route))
        self.registry = Registry(self.args.tracking_uri)
        self.routing = Routing(
            self.cascade,
            deployed=lambda: self.config.cascade_version if self.config else "",
            resolve=self.variant,
            store=RegistryRouteStore(self.registry, self.args.workload),
            shadow_limit=cfg.shadow_max_in_flight,
            shadow_timeout_s=cfg.request_timeout_s,
        )
        self.watch: asyncio.Task | None = None
        self.replicas_watch: asyncio.Task | None = None
        self.tier_replicas = {"cheap": 1}  # running replicas, from serve.status()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self.loop = asyncio.get_running_loop()  # the loop requests and handles run on
        self.config = IngressConfig.model_validate(user_config)
        self.cascade.calibrated(self.config.cheap_version, self.config.threshold)
        log.info("cascade %s, threshold %.4f", self.config.cascade_version, self.config.threshold)
        if self.watch is None:  # the first config: read the routing table before serving
            try:
                await asyncio.wait_for(self.routing.refresh(), ROUTES_READ_TIMEOUT_S)
            except Exception:  # serve the deployed cascade; the watch tries again
                log.exception("reading the routing table failed; serving the deployed cascade")
            self.watch = asyncio.get_running_loop().create_task(
                self.routing.watch(self.args.serve.routes_poll_s)
            )
            self.replicas_watch = asyncio.get_running_loop().create_task(
                watch_replicas({"cheap": self.handles["cheap"]}, self.tier_replicas)
            )

    def variant(self, ref: str) -> tuple[str, RoutedCascade]:
        """Cascade ``ref`` as a routed version: its tiers' models, named to the cheap
        tier by model id, and its own threshold.

        Runs in a thread (the registry reads block); the handles are bound on the
        replica's event loop, which owns them: with Ray's throughput bundle their router
        runs on that loop and is not thread-safe."""
        int8 = self.config.int8_tiers if self.config else []
        models = cascade_models(self.registry, get_workload(self.args.workload), ref, int8)
        if self.loop is None or _running_loop() is self.loop:
            return models.ref.version, self._bind(models)
        bound = asyncio.run_coroutine_threadsafe(self._bind_on_loop(models), self.loop)
        return models.ref.version, bound.result(timeout=ROUTES_READ_TIMEOUT_S)

    async def _bind_on_loop(self, models: CascadeModels) -> RoutedCascade:
        return self._bind(models)

    def _bind(self, models: CascadeModels) -> RoutedCascade:
        ids = {tier: models.tiers[tier].model_id for tier in self.handles}
        route = CascadeRoute(models.ref.version, ids["cheap"], ids["expensive"],
                             models.spec.threshold)  # fmt: skip
        for tier, model_id in ids.items():  # loading now: the first requests need not wait
            self.handles[tier].options(multiplexed_model_id=model_id).load.remote(model_id)
        call = cascade_fn(self.handles["cheap"], lambda: route, model_id=ids["cheap"])
        return RoutedCascade(route.key, self.coalesced(call))

    def coalesced(self, fn: CascadeFn) -> Coalescer:
        """``fn`` with concurrent calls sent as one: at most serve.tier_calls_in_flight
        per running replica of the cheap tier (one replica's worth while it has none)."""
        cfg = self.args.serve
        return Coalescer(
            fn,
            max_in_flight=lambda: cfg.tier_calls_in_flight * max(1, self.tier_replicas["cheap"]),
            max_rows=cfg.batch.max_batch_size,
            call_timeout_s=cfg.request_timeout_s,
            tag=request_id,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        cfg = self.args.serve
        return build_api(
            get_workload(self.args.workload),
            self.routing,
            keys=KeyRing(self.args.api_keys),
            max_instances=cfg.max_instances_per_request,
            max_body_bytes=cfg.max_body_bytes,
            request_timeout_s=cfg.request_timeout_s,
            route_header=cfg.route_header,
            observer=ServeMetrics(),
            costs=self.costs,
        )
