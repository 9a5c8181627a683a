"""Calls to a tier deployment, as the ingress (to the cheap tier) and the cheap tier (to
the expensive tier) make them: a tier that cannot answer is a 503, never a 500; a failed
call is retried once; and how many replicas a tier runs, for how many calls to keep out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from app.errors import ServiceUnavailable
from serve_graphs.cascade import CascadeAnswer, Instances, TierAnswer, TierFn
from serve_graphs.coalesce import callers

if TYPE_CHECKING:
    from serve_graphs.escalate import CascadeFn, CascadeRoute

log = logging.getLogger("ray.serve")
T = TypeVar("T")
REPLICAS_POLL_S = 5.0  # how often a caller reads how many replicas its tier runs


class TierFailed(ServiceUnavailable):
    """A tier call that failed (a replica died mid-call), as opposed to one refused for
    load: worth one more try, since a prediction is idempotent."""


def tier_fn(
    handle: DeploymentHandle,
    tier: str,
    *,
    model_id: str | None = None,
    retry_wait_s: float = 0.05,
) -> TierFn:
    """A tier's probabilities, as the cascade sees them.

    ``model_id`` (``name/version``) asks for a version other than the one the tier is
    pinned to (a routed A/B version): Serve's model multiplexing sends the call to a
    replica that has it loaded, if one has."""
    if model_id is not None:
        handle = handle.options(multiplexed_model_id=model_id)

    async def probs(instances: Instances) -> TierAnswer:
        # The requests whose rows these are, for the tier's log.
        answer, version = await handle.predict.remote(instances, model_id, callers())
        return TierAnswer(answer, version)

    return retried(probs, tier, retry_wait_s)


def cascade_fn(
    handle: DeploymentHandle,
    route: Callable[[], CascadeRoute],
    *,
    model_id: str | None = None,
    retry_wait_s: float = 0.05,
) -> CascadeFn:
    """The cascade of ``route()`` (read at each call, so a new calibration applies at
    once), run by the cheap tier: its answers for rows, the expensive tier's included
    where the cheap one was unsure. ``model_id``: the cheap version the route names, for
    Serve's multiplexing, as for :func:`tier_fn`."""
    if model_id is not None:
        handle = handle.options(multiplexed_model_id=model_id)

    async def predictions(instances: Instances) -> CascadeAnswer:
        return await handle.cascade.remote(instances, route(), callers())

    return retried(predictions, "cheap", retry_wait_s)


def retried(
    call: Callable[[Instances], Awaitable[T]], tier: str, retry_wait_s: float
) -> Callable[[Instances], Awaitable[T]]:
    """``call`` with Serve's errors as 503s, and a failed call retried once after
    ``retry_wait_s``: predictions are idempotent. A call refused for load is not retried:
    that would add to the load.

    The retry is not tenacity's, unlike the registry reads' (``tier_model.py``): its
    state for each call (an ``AsyncRetrying``, futures, a lock, closures: ~30 objects in
    reference cycles) is garbage that only Python's cyclic collector frees. At ~100 tier
    calls a second that set off a 25-80 ms collection, a pause of every request in the
    ingress, every ~12 s (bench/results/2026-11-29-serve.md).
    """

    async def attempt(instances: Instances) -> T:
        try:
            return await call(instances)
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {tier} tier is at capacity: retry shortly") from exc
        except (RayServeException, RayError) as exc:  # a dead replica, a failed model call
            log.warning("the %s tier failed for requests %s: %s", tier, callers(), exc)
            raise TierFailed(
                f"the {tier} tier could not answer ({type(exc).__name__}): retry shortly"
            ) from exc

    async def once_more(instances: Instances) -> T:
        try:
            return await attempt(instances)
        except TierFailed:  # once the router has had a moment to drop a dead replica
            await asyncio.sleep(retry_wait_s)
        return await attempt(instances)

    return once_more


async def watch_replicas(
    handles: dict[str, DeploymentHandle], running: dict[str, int], every_s: float = REPLICAS_POLL_S
) -> None:
    """Keep ``running`` (tier -> running replicas) current, from ``serve.status()``, so
    a caller keeps ``serve.tier_calls_in_flight`` calls out per running replica and
    replicas an autoscaler adds get work at once. A failed read keeps the last."""
    while True:
        try:
            status = await asyncio.to_thread(serve.status)
            for tier, handle in handles.items():
                app = status.applications[handle.app_name]
                states = app.deployments[handle.deployment_name].replica_states
                running[tier] = states.get("RUNNING", 0)
        except Exception:  # noqa: BLE001 - the controller is away for a moment
            log.warning("could not read the tiers' replicas; calls stay at %s", running,
                        exc_info=True)  # fmt: skip
        await asyncio.sleep(every_s)
