"""The cascade run where the cheap tier's answer is, free of Ray: the cheap tier sends the
rows it is unsure of on to the expensive tier itself.

The ingress's event loop is the graph's bottleneck (one replica, about one core). When
the ingress ran the cascade, an escalated request went through that loop's queue twice,
once per tier call, and the second call cost it another coalesced handle call. With
:class:`Escalation` in the cheap tier, every request is one call from the ingress; the
hop to the expensive tier runs on the cheap tier's loop, which is nearly idle
(bench/results/2026-11-29-serve.md, fourth session). The decision is still :class:`~serve_graphs.
cascade.Cascade`'s, with its timeout and circuit breaker around the expensive tier.

:class:`RemoteCascade` is the ingress's side: the interface :class:`~serve_graphs.
routing.Routing` needs (``predict``, ``calibrated``), the thresholds the ingress's
config carries, and the meters (cost report, degraded counts) fed from the answers.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from serve_graphs.cascade import (
    Cascade,
    CascadeAnswer,
    CircuitBreaker,
    Instances,
    Prediction,
    TierAnswer,
    TierFn,
    calibrated,
)

CascadeFn = Callable[[Instances], Awaitable[CascadeAnswer]]
KEPT = 16  # routed cascades whose breakers and expensive-tier callers a tier keeps


@dataclass(frozen=True)
class CascadeRoute:
    """Which cascade a call to the cheap tier runs, as the ingress sends it.

    ``key``: "" for the deployed cascade, else the routed cascade version (each has its
    own breaker, so a failing challenger never degrades the champion's answers).
    ``cheap``/``expensive``: the tiers' model ids, None for their pinned versions.
    ``thresholds``: by the cheap tier's version label (during a swap the outgoing version
    keeps its own); ``threshold`` for any other."""

    key: str
    cheap: str | None
    expensive: str | None
    threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)


class _Spent:
    """What one cascade call's tiers cost, and why it degraded, if it did."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self.reason = ""

    def tier_call(self, tier: str, rows: int, seconds: float) -> None:
        self.seconds[tier] += seconds

    def degraded(self, rows: int, reason: str) -> None:
        self.reason = reason


class Escalation:
    """The cheap tier's cascade: ``cheap(rows, model_id)`` answers on this replica,
    ``expensive(model_id)`` is the expensive tier's caller for a model id (coalesced).
    Breakers and callers are kept per route key and model id, the last :data:`KEPT`."""

    def __init__(
        self,
        cheap: Callable[[Instances, str | None], Awaitable[TierAnswer]],
        expensive: Callable[[str | None], TierFn],
        *,
        expensive_timeout_s: float,
        breaker_failures: int,
        breaker_reset_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cheap = cheap
        self.expensive = expensive
        self.expensive_timeout_s = expensive_timeout_s
        self.new_breaker = lambda: CircuitBreaker(breaker_failures, breaker_reset_s, clock)
        self.breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self.callers: OrderedDict[str | None, TierFn] = OrderedDict()

    async def __call__(self, instances: Instances, route: CascadeRoute) -> CascadeAnswer:
        spent = _Spent()

        async def cheap(rows: Instances) -> TierAnswer:
            return await self.cheap(rows, route.cheap)

        cascade = Cascade(
            cheap,
            _kept(self.callers, route.expensive, lambda: self.expensive(route.expensive)),
            route.threshold,
            expensive_timeout_s=self.expensive_timeout_s,
            breaker=_kept(self.breakers, route.key, self.new_breaker),
            on_degraded=spent.degraded,
            on_tier_call=spent.tier_call,
        )
        cascade.thresholds = route.thresholds
        predictions = await cascade.predict(instances)
        return CascadeAnswer(
            predictions, spent.seconds["cheap"], spent.seconds["expensive"], spent.reason
        )


def _kept(kept: OrderedDict, key: object, make: Callable[[], object]):  # noqa: ANN202
    """``kept[key]``, made on first use; the least recently used go past :data:`KEPT`."""
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    kept[key] = value = make()
    while len(kept) > KEPT:
        kept.popitem(last=False)
    return value


@dataclass(frozen=True)
class RoutedCascade:
    """A routed cascade version, as the ingress calls it: through the cheap tier."""

    version: str
    call: CascadeFn


class RemoteCascade:
    """The ingress's side of the cascade the cheap tier runs (:class:`Escalation`).

    ``call`` runs the deployed cascade (its route from :meth:`route`, read when a call
    goes out); a :class:`RoutedCascade` runs another. Answers feed ``on_tier_call`` and
    ``on_degraded`` as :class:`Cascade` does, except for shadow copies (``record=False``).
    """

    def __init__(
        self,
        call: CascadeFn | None = None,
        *,
        on_degraded: Callable[[int, str], None] = lambda n, reason: None,
        on_tier_call: Callable[[str, int, float], None] = lambda tier, rows, seconds: None,
    ) -> None:
        self.call = call
        self.threshold = 1.0  # until calibrated: everything escalates
        self.thresholds: dict[str, float] = {}
        self.on_degraded = on_degraded
        self.on_tier_call = on_tier_call

    def calibrated(self, cheap_version: str, threshold: float) -> None:
        self.thresholds = calibrated(self.thresholds, cheap_version, threshold)
        self.threshold = threshold

    def route(self) -> CascadeRoute:
        return CascadeRoute("", None, None, self.threshold, self.thresholds)

    async def predict(
        self, instances: Instances, variant: RoutedCascade | None = None, *, record: bool = True
    ) -> list[Prediction]:
        call = variant.call if variant else self.call
        answer = await call(instances)
        if record:
            self.on_tier_call("cheap", len(answer), answer.cheap_seconds)
            escalated = answer.escalated()
            if escalated:
                self.on_tier_call("expensive", escalated, answer.expensive_seconds)
            degraded = sum(p.degraded for p in answer.predictions)
            if degraded:
                self.on_degraded(degraded, answer.degraded_reason)
        return answer.predictions
