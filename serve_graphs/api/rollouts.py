"""Admin routes (scope ``admin``) of gated rollouts: start, status, pause, resume, abort.

The same five commands as ``scaledl rollout``, which calls them. The rollout itself
runs in the cluster's rollout controller (actors/rollout_actor.py), reached through a
:class:`RolloutsPort`; these routes only name the model, fill in the champion (the
deployed cascade version) and map the controller's answers and errors to HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Body, Depends

from app.workloads import Workload
from serve_graphs.api.admin import check_name


class RolloutsPort(Protocol):
    """The controller's commands; each answers the model's rollout status. ``start``
    resolves an alias given as challenger (or champion) to its version first."""

    async def start(self, spec: dict[str, Any]) -> dict[str, Any]: ...

    async def status(self, model: str) -> dict[str, Any]: ...

    async def pause(self, model: str) -> dict[str, Any]: ...

    async def resume(self, model: str) -> dict[str, Any]: ...

    async def abort(self, model: str) -> dict[str, Any]: ...


START_EXAMPLE = {"challenger": "challenger", "steps": "5,25,50,100", "hold_s": "2m",
                 "min_requests": 500, "shadow_first_s": "2m"}  # fmt: skip


def rollout_router(
    workload: Workload,
    rollouts: RolloutsPort,
    deployed: Callable[[], str],
    *,
    key_for: Callable[[str], Any],
) -> APIRouter:
    router = APIRouter(prefix="/v1/models/{name}/rollout", tags=["rollouts"])
    admin = [Depends(key_for("admin"))]

    @router.post(
        "",
        dependencies=admin,
        summary="Start a gated rollout of a challenger cascade version",
        description="Moves the routing table through the steps (the challenger's percent "
        "of traffic); at each, once the hold has passed and each arm has min_requests, "
        "judges the challenger against the champion on live, cluster-wide figures (errors, "
        "p99 and its shift, shadow disagreement), then steps on, rolls back at once, or "
        "pauses when the data stays too thin. A pass at 100 % promotes. Durations: 90, "
        "'90s', '2m', '1h'. The champion defaults to the deployed cascade version.",
    )
    async def start(
        name: str, spec: Annotated[dict[str, Any], Body(examples=[START_EXAMPLE])]
    ) -> dict[str, Any]:
        check_name(workload, name)
        return await rollouts.start({"champion": deployed(), **spec, "model": name})

    @router.get("", dependencies=admin, summary="The rollout: steps, verdicts, gate figures")
    async def status(name: str) -> dict[str, Any]:
        check_name(workload, name)
        return await rollouts.status(name)

    def command(method: Callable[[str], Any]) -> Callable[[str], Any]:
        async def act(name: str) -> dict[str, Any]:
            check_name(workload, name)
            return await method(name)

        return act

    for path, method, summary in (
        ("pause", rollouts.pause, "Hold the rollout at its step (its weights stay)"),
        ("resume", rollouts.resume, "Restart the paused step: its weights, a fresh hold"),
        ("abort", rollouts.abort, "Back to the champion alone, at once"),
    ):
        router.add_api_route(
            f"/{path}", command(method), methods=["POST"], dependencies=admin, summary=summary
        )
    return router
