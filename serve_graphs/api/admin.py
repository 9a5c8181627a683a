"""Admin routes (scope ``admin``): the live cost of serving and the routing table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query

from app.errors import NotFound
from app.keys import ApiKey
from app.workloads import Workload
from serve_graphs.api.observe import CostMeter, LiveStats
from serve_graphs.decide.routing import RouteSpec, Routing

WINDOW_S = 300.0  # the live statistics the routes view reports by default: 5 minutes


def check_name(workload: Workload, name: str) -> None:
    if name != workload.name:
        raise NotFound(f"unknown model {name!r}: this service serves {workload.name!r}")


def admin_router(
    workload: Workload,
    routing: Routing,
    costs: CostMeter,
    live: LiveStats | None,
    *,
    key_for: Callable[[str], Any],
) -> APIRouter:
    router = APIRouter(prefix="/v1/models/{name}", tags=["admin"])
    admin = Depends(key_for("admin"))

    @router.get(
        "/cost",
        dependencies=[admin],
        summary="Live cost of serving: expensive-tier share, compute per request",
        description="What this ingress replica has seen since it started: instances "
        "answered, the share the expensive tier answered, escalated and degraded shares, "
        "tier time per instance, and the estimated compute per instance and per request. "
        "With several ingress replicas, each reports its own traffic.",
    )
    async def cost(name: str) -> dict[str, float | int]:
        check_name(workload, name)
        return costs.report()

    async def routes_view(window_s: float) -> dict[str, Any]:
        table = routing.table
        stats = (
            await live.view(window_s)
            if live
            else {"window_s": window_s, "versions": {}, "off": "ops.live_stats is false"}
        )
        return {
            "deployed": routing.deployed(),
            "table": table.model_dump() if table else None,
            "served_versions": routing.versions(),
            "stats": stats,
        }

    window = Query(
        WINDOW_S,
        gt=0,
        le=3600,
        alias="window_s",
        description="Seconds of live statistics to report, up to ops.stats_retention_s.",
    )

    @router.get(
        "/routes",
        dependencies=[admin],
        summary="The routing table, and live figures per version",
        description="The table (null: every request goes to the deployed cascade), the "
        "versions a request may name, and, cluster-wide over the last window_s seconds "
        "(every ingress replica reports every ops.report_every_s): per cascade version, "
        "requests by outcome, error rate, p50/p99 latency, escalated and degraded shares, "
        "and, for a shadow version, its agreement with the answers returned.",
    )
    async def routes(name: str, window_s: float = window) -> dict[str, Any]:
        check_name(workload, name)
        return await routes_view(window_s)

    @router.put(
        "/routes",
        summary="Set the routing table (A/B, canary, shadow) without redeploying",
        description="Weights are whole percents over cascade versions or aliases and sum "
        "to 100; aliases resolve now, so a later promotion does not move traffic. The "
        "table is stored in the registry: every ingress replica applies it within "
        "serve.routes_poll_s seconds, and it outlives redeploys.",
    )
    async def set_routes(name: str, spec: RouteSpec, key: ApiKey = admin) -> dict[str, Any]:
        check_name(workload, name)
        await routing.set(spec, by=key.id)
        return await routes_view(WINDOW_S)

    @router.delete("/routes", summary="Drop the table: every request to the deployed cascade")
    async def clear_routes(name: str, key: ApiKey = admin) -> dict[str, Any]:
        check_name(workload, name)
        await routing.set(None, by=key.id)
        return await routes_view(WINDOW_S)

    return router
