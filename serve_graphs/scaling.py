"""Tier autoscaling on how busy the replicas are, not on their calls in flight.

Serve's default policy scales a deployment on its requests in flight per replica. A
tier's requests are its callers' coalesced calls (serve_graphs/coalesce.py; the ingress
calls the cheap tier, the cheap tier the expensive one): at most
``serve.tier_calls_in_flight`` per calling replica and tier replica, however many rows
wait behind them. That count says nothing about load, so a tier would never scale out
while its callers hold the queue. What does say it is the share of its time a replica
spends running batches: each replica reports it (:class:`BusyMeter`, read by Serve
through ``record_autoscaling_stats``) and :class:`BusyTierPolicy` sizes the tier so
that each replica is ``target_busy`` busy.

Serve's controller runs the policy (named by import path in the deployment's
``autoscaling_config``; Serve pickles its module by value), so this module imports only
the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

BUSY = "busy"  # the custom autoscaling metric: fraction of time spent running batches
POLICY = f"{__name__}:BusyTierPolicy"


class BusyMeter:
    """The fraction of wall time spent inside :meth:`running` since the last :meth:`read`.

    A replica runs one batch at a time (``@serve.batch``, one batch in flight), so the
    fraction is between 0 (idle) and 1 (a batch always running: the replica is the
    bottleneck)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since = clock()
        self.busy_s = 0.0
        self.started: float | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        self.started = self.clock()
        try:
            yield
        finally:
            self.busy_s += self.clock() - self.started
            self.started = None

    def read(self) -> float:
        """Busy fraction since the previous reading (a batch still running counts up to
        now); starts the next window."""
        now = self.clock()
        busy = self.busy_s
        if self.started is not None:  # count the running batch's part so far, once
            busy += now - self.started
            self.started = now
        fraction = busy / (now - self.since) if now > self.since else 0.0
        self.since, self.busy_s = now, 0.0
        return min(1.0, fraction)


class BusyTierPolicy:
    """Serve autoscaling policy for a tier: enough replicas that each is ``target_busy``
    busy, averaged over the look-back window; at least one while calls come in; none
    when idle (if ``min_replicas`` is 0).

    Serve wraps it with the deployment's own settings: min/max replicas, the upscale and
    downscale delays, scaling to zero and the cold start from zero."""

    def __init__(self, target_busy: float = 0.6) -> None:
        if not 0 < target_busy <= 1:
            raise ValueError(f"target_busy must be in (0, 1], not {target_busy}")
        self.target_busy = target_busy

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        busy = ctx.aggregated_metrics.get(BUSY, {})
        calls = ctx.total_num_requests
        if not busy:  # no replica has reported yet (just started): hold
            return ctx.current_num_replicas, {}
        desired = sum(busy.values()) / self.target_busy
        if calls > 0:
            desired = max(desired, 1.0)
        return desired, {}
