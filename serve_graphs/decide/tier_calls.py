"""Calls to a tier deployment, as the ingress (to the cheap tier) and the cheap tier (to
the expensive tier) make them, and what their failures become:

- refused for load (Serve's backpressure): :class:`~app.errors.Overloaded`, a 503 with
  Retry-After, not retried (that would only add load);
- a replica that died under the call: :class:`TierFailed`, retried once after a moment,
  since a prediction is idempotent; a 503 if it fails again;
- an error the tier raised on purpose (one of ours: a version it cannot load, say): that
  error, with its own status;
- any other exception in the tier's code (a bug): :class:`~app.errors.TierError`, a 500,
  logged here with the request ids and never retried.

Also how many replicas a tier runs, for how many calls to keep out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from app.errors import Overloaded, ScaledlError, ServiceUnavailable, TierError
from app.sections import ServeConfig
from serve_graphs.decide.cascade import CascadeAnswer, Instances, TierAnswer, TierFn
from serve_graphs.decide.coalesce import Coalescer, callers

if TYPE_CHECKING:
    from serve_graphs.decide.cascade import CascadeFn, CascadeRoute

log = logging.getLogger("ray.serve")
T = TypeVar("T")
REPLICAS_POLL_S = 2.0  # how often a caller reads how many replicas its tier runs


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


def tier_caller(
    handle: DeploymentHandle,
    tier: str,
    cfg: ServeConfig,
    model_id: str | None = None,
    *,
    replicas: Callable[[], int],
    max_rows: Callable[[], int],
    timeout_s: float,
    tag: Callable[[], str],
    route: Callable[[], CascadeRoute] | None = None,
) -> Coalescer:
    """How a caller calls a tier: concurrent calls sent as one (``serve.
    tier_calls_in_flight`` per running replica, one replica's worth while it has none),
    each of at most ``max_rows()`` rows, with at most ``serve.tier_max_waiting_rows``
    rows waiting and each caller's wait bounded by ``timeout_s``.

    ``route`` given: the cascade of ``route()``, run by the cheap tier (the ingress's
    call, :func:`cascade_fn`); otherwise the tier's probabilities (:func:`tier_fn`,
    the cheap tier's call to the expensive one). ``model_id`` as for those."""
    fn = (
        tier_fn(handle, tier, model_id=model_id)
        if route is None
        else cascade_fn(handle, route, model_id=model_id)
    )
    return Coalescer(
        fn,
        max_in_flight=lambda: cfg.tier_calls_in_flight * max(1, replicas()),
        max_rows=max_rows,
        max_waiting_rows=cfg.tier_max_waiting_rows,
        timeout_s=timeout_s,
        name=tier,
        tag=tag,
    )


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
    """``call`` with a tier's failures mapped as the module says, and a failed call
    retried once after ``retry_wait_s``: predictions are idempotent.

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
            raise Overloaded(f"the {tier} tier is at capacity: retry shortly") from exc
        except RayTaskError as exc:  # the tier's own code raised
            ours = exc.cause if isinstance(exc.cause, ScaledlError) else None
            if ours is not None:
                raise ours from None
            # The type only: the message and traceback are in the tier's own log, and
            # a message may quote a value of the request.
            name = type(exc.cause).__name__
            log.error("the %s tier raised %s for requests %s", tier, name, " ".join(callers()))
            raise TierError(
                f"the {tier} tier failed on this request ({name}); it is logged with the "
                "request's id"
            ) from None
        except (RayServeException, RayError) as exc:  # a dead replica, a lost connection
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
    handles: dict[str, DeploymentHandle],
    running: dict[str, int],
    every_s: float = REPLICAS_POLL_S,
    *,
    once: bool = False,
) -> None:
    """Keep ``running`` (tier -> running replicas) current, from ``serve.status()``, so
    a caller keeps ``serve.tier_calls_in_flight`` calls out per running replica,
    replicas an autoscaler adds get work at once, and readiness knows whether a tier
    runs. A failed read keeps the last, and so does a tier the status does not list
    (while a redeploy replaces the application, it lists no deployments for a moment).
    ``once``: read once and return."""
    while True:
        try:
            status = await asyncio.to_thread(serve.status)
            for tier, handle in handles.items():
                app = status.applications.get(handle.app_name)
                deployment = app.deployments.get(handle.deployment_name) if app else None
                if deployment is not None:
                    running[tier] = deployment.replica_states.get("RUNNING", 0)
        except Exception:  # noqa: BLE001 - the controller is away for a moment
            log.warning("could not read the tiers' replicas; calls stay at %s", running,
                        exc_info=True)  # fmt: skip
        if once:
            return
        await asyncio.sleep(every_s)
