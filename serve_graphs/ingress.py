"""Ingress: the HTTP entry (FastAPI) with auth, validation and routing; the cheap tier
runs the cascade it routes to.

A thin wrapper: the app is ``serve_graphs.api.app.build_api``'s, the routing
``decide.routing.Routing``'s and the cascade's caller ``decide.cascade.CascadeCaller``.
This file wires them to Serve: the handles, ``user_config`` and the registry."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.serving_stats import StatsClient
from app.keys import KeyRing
from app.registry import Registry
from app.workloads import get_workload
from serve_graphs.api.app import build_api
from serve_graphs.api.limits import RateLimiter
from serve_graphs.api.observe import LiveStats
from serve_graphs.args import GraphArgs, IngressConfig
from serve_graphs.catalog import CascadeModels, RegistryRouteStore, cascade_models
from serve_graphs.decide.cascade import CascadeCaller, CascadeFn, CascadeRoute, RoutedCascade
from serve_graphs.decide.readiness import Readiness
from serve_graphs.decide.routing import Routing
from serve_graphs.decide.tier_calls import tier_caller, watch_replicas
from serve_graphs.metrics import ServeMetrics
from serve_graphs.rollouts import ActorRollouts

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
        self.cascade = CascadeCaller()
        self.cascade.call = self.caller(self.cascade.route)
        self.registry = Registry(self.args.tracking_uri)
        self.routing = Routing(
            self.cascade,
            deployed=lambda: self.cascade.version,
            resolve=self.variant,
            store=RegistryRouteStore(self.registry, self.args.workload),
            shadow_limit=cfg.shadow_max_in_flight,
            shadow_timeout_s=cfg.request_timeout_s,
        )
        self.tier_replicas = {"cheap": 0, "expensive": 0}  # running, from serve.status()
        self.readiness = Readiness(
            self.tier_replicas,
            lambda: set(self.config.cold_start_tiers) if self.config else set(),
        )
        ops = self.args.ops
        self.live = (
            LiveStats(
                self.args.workload,
                StatsClient(ops.stats_retention_s),
                every_s=ops.report_every_s,
                bucket_s=ops.stats_bucket_s,
            )
            if ops.live_stats
            else None
        )
        self.tasks: list[asyncio.Task] = []  # the watches, and routed versions' loads
        self.loop: asyncio.AbstractEventLoop | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self.loop = asyncio.get_running_loop()  # the loop requests and handles run on
        previous, self.config = self.config, IngressConfig.model_validate(user_config)
        config = self.config
        self.cascade.calibrated(config.cascade_version, config.cheap_version, config.threshold)
        log.info("cascade %s, threshold %.4f", config.cascade_version, config.threshold)
        if previous is None:  # the first config: read the routing table before serving
            await watch_replicas(self.handles, self.tier_replicas, once=True)
            try:
                await asyncio.wait_for(self.routing.refresh(), ROUTES_READ_TIMEOUT_S)
            except Exception:  # serve the deployed cascade; the watch tries again
                log.exception("reading the routing table failed; serving the deployed cascade")
            self.tasks += [
                self.loop.create_task(self.routing.watch(self.args.serve.routes_poll_s)),
                self.loop.create_task(watch_replicas(self.handles, self.tier_replicas)),
            ]
            if self.live:  # on this loop: the recorder is counted into from it
                self.tasks.append(self.loop.create_task(self.live.run()))
        elif previous.int8_tiers != config.int8_tiers:  # routed versions run so too
            await self.routing.rebind()

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
        version = models.ref.version
        ids = {tier: models.tiers[tier].model_id for tier in self.handles}
        route = CascadeRoute(version, ids["cheap"], ids["expensive"], models.spec.threshold)
        # Loading now: the first requests need not wait, and readiness waits for it.
        self.readiness.loading(version)
        self.tasks.append(asyncio.get_running_loop().create_task(self._load(version, ids)))
        return RoutedCascade(version, self.caller(lambda: route, ids["cheap"]))

    async def _load(self, version: str, ids: dict[str, str]) -> None:
        try:
            await asyncio.gather(
                *(
                    self.handles[tier].options(multiplexed_model_id=model_id).load.remote(model_id)
                    for tier, model_id in ids.items()
                )
            )
        except Exception as exc:  # noqa: BLE001 - readiness says so; requests will too
            log.warning("loading version %s failed: %s", version, type(exc).__name__)
            self.readiness.loaded(version, type(exc).__name__)
        else:
            self.readiness.loaded(version)
        finally:
            self.tasks = [t for t in self.tasks if not t.done()]

    def caller(self, route: Callable[[], CascadeRoute], model_id: str | None = None) -> CascadeFn:
        """The cascade of ``route()`` through the cheap tier, concurrent requests as one
        call (``tier_calls.tier_caller``), each of at most serve.batch.max_batch_size rows
        and each request waiting at most serve.request_timeout_s."""
        return tier_caller(
            self.handles["cheap"],
            "cheap",
            self.args.serve,
            model_id,
            replicas=lambda: self.tier_replicas["cheap"],
            max_rows=lambda: self.config.max_batch_size if self.config else 64,
            timeout_s=self.args.serve.request_timeout_s,
            tag=request_id,
            route=route,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        cfg = self.args.serve
        keys = KeyRing(self.args.api_keys, self.args.keys_file, poll_s=cfg.keys_poll_s)
        return build_api(
            get_workload(self.args.workload),
            self.routing,
            keys=keys,
            limits=RateLimiter(cfg.rate_limits),
            readiness=self.readiness,
            max_instances=cfg.max_instances_per_request,
            max_body_bytes=cfg.max_body_bytes,
            body_timeout_s=cfg.body_timeout_s,
            request_timeout_s=cfg.request_timeout_s,
            route_header=cfg.route_header,
            observer=ServeMetrics(),
            live=self.live,
            faults=lambda: self.config.faults if self.config else {},
            rollouts=ActorRollouts(self.args.tracking_uri, self.args.workload),
        )
