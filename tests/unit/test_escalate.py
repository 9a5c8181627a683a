"""The cascade run in the cheap tier (Escalation) and the ingress's side of it
(RemoteCascade), without Ray: the tiers are async functions, and the "handle" below
stands in for a Serve DeploymentHandle to the cheap tier (no cluster here)."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from app.errors import ServiceUnavailable
from serve_graphs.cascade import TierAnswer
from serve_graphs.coalesce import Coalescer
from serve_graphs.escalate import CascadeRoute, Escalation, RemoteCascade, RoutedCascade
from serve_graphs.observe import CostMeter
from serve_graphs.tier_calls import cascade_fn

DEPLOYED = CascadeRoute("", None, None, threshold=0.7, thresholds={"digits-cheap/1": 0.7})


class Tiers:
    """A cheap tier sure of a row (0.9) when its first feature is 1, unsure (0.6)
    otherwise, per model id; an expensive tier that answers label 1 at 0.99, or fails."""

    def __init__(self, expensive_fails: bool = False) -> None:
        self.cheap_calls: list[tuple[int, str | None]] = []
        self.expensive_calls: list[tuple[int, str | None]] = []
        self.expensive_fails = expensive_fails

    async def cheap(self, rows: np.ndarray, model_id: str | None) -> TierAnswer:
        self.cheap_calls.append((len(rows), model_id))
        sure = rows[:, 0] == 1
        probs = np.where(sure[:, None], [[0.9, 0.1]], [[0.6, 0.4]])
        return TierAnswer(probs, model_id or "digits-cheap/1")

    def expensive(self, model_id: str | None):  # noqa: ANN201 - a TierFn
        async def call(rows: np.ndarray) -> TierAnswer:
            self.expensive_calls.append((len(rows), model_id))
            if self.expensive_fails:
                raise ServiceUnavailable("the expensive tier could not answer")
            return TierAnswer(np.tile([[0.01, 0.99]], (len(rows), 1)), model_id or "digits-exp/1")

        return call

    def escalation(self) -> Escalation:
        return Escalation(
            self.cheap,
            self.expensive,
            expensive_timeout_s=5,
            breaker_failures=2,
            breaker_reset_s=60,
        )


def rows(*first: int) -> np.ndarray:
    return np.array([[f, 0.0] for f in first])


def test_the_cheap_tier_escalates_only_the_rows_it_is_unsure_of() -> None:
    tiers = Tiers()
    answer = asyncio.run(tiers.escalation()(rows(1, 0, 1, 0), DEPLOYED))
    assert [(p.tier, p.label) for p in answer.predictions] == [
        ("cheap", 0),
        ("expensive", 1),
        ("cheap", 0),
        ("expensive", 1),
    ]
    assert [p.model_version for p in answer.predictions][:2] == ["digits-cheap/1", "digits-exp/1"]
    assert tiers.expensive_calls == [(2, None)]  # the unsure two, in one call
    assert answer.escalated() == 2 and answer.cheap_seconds > 0


def test_a_routed_cascade_runs_its_own_models_and_threshold() -> None:
    tiers = Tiers()
    route = CascadeRoute("7", "digits-cheap/4", "digits-exp/5", threshold=0.95)
    answer = asyncio.run(tiers.escalation()(rows(1, 0), route))
    assert tiers.cheap_calls == [(2, "digits-cheap/4")]
    assert tiers.expensive_calls == [(2, "digits-exp/5")]  # 0.9 is unsure at 0.95
    assert {p.model_version for p in answer.predictions} == {"digits-exp/5"}


def test_answers_of_a_swapped_out_cheap_version_are_judged_by_its_own_threshold() -> None:
    tiers = Tiers()
    swap = CascadeRoute("", None, None, 0.5, {"digits-cheap/1": 0.95, "digits-cheap/2": 0.5})
    asyncio.run(tiers.escalation()(rows(1), swap))
    assert tiers.expensive_calls == [(1, None)]  # digits-cheap/1 answered: 0.9 < 0.95


def test_a_failing_expensive_tier_degrades_and_its_breaker_opens_per_route() -> None:
    tiers = Tiers(expensive_fails=True)
    escalation = tiers.escalation()

    async def twice_then_more() -> list:
        return [await escalation(rows(0), DEPLOYED) for _ in range(4)]

    answers = asyncio.run(twice_then_more())
    assert all(a.predictions[0].degraded and a.predictions[0].tier == "cheap" for a in answers)
    assert [a.degraded_reason for a in answers] == ["unavailable"] * 2 + ["breaker_open"] * 2
    assert len(tiers.expensive_calls) == 2  # open after two failures: no more calls
    assert escalation.breakers[""].state == "open"
    challenger = CascadeRoute("7", "digits-cheap/4", "digits-exp/5", threshold=0.7)
    answer = asyncio.run(escalation(rows(0), challenger))
    assert answer.degraded_reason == "unavailable"  # tried: its breaker is its own
    assert tiers.expensive_calls[-1] == (1, "digits-exp/5")


class CheapTierHandle:
    """``handle.cascade.remote(rows, route, requests)`` answered by an Escalation, as the
    cheap tier's replica does; ``options`` is Serve's multiplexing (ignored here)."""

    def __init__(self, escalation: Escalation) -> None:
        self.escalation = escalation
        self.cascade = self
        self.calls: list[tuple[int, str]] = []

    def options(self, **kwargs: object) -> CheapTierHandle:
        return self

    def remote(self, instances: np.ndarray, route: CascadeRoute, requests=()):  # noqa: ANN001, ANN201
        self.calls.append((len(instances), route.key))
        return self.escalation(instances, route)


def remote_cascade(handle: CheapTierHandle, costs: CostMeter, degraded: list) -> RemoteCascade:
    """The ingress's cascade, wired as Ingress wires it."""
    cascade = RemoteCascade(
        on_degraded=lambda n, reason: degraded.append((n, reason)), on_tier_call=costs.tier_call
    )
    call = cascade_fn(handle, cascade.route, retry_wait_s=0)
    cascade.call = Coalescer(call, max_in_flight=1, max_rows=64, call_timeout_s=5)
    cascade.calibrated("digits-cheap/1", 0.7)
    return cascade


def test_concurrent_requests_go_as_one_call_and_each_gets_its_own_answers_and_costs() -> None:
    handle = CheapTierHandle(Tiers().escalation())
    costs, degraded = CostMeter(), []
    cascade = remote_cascade(handle, costs, degraded)

    async def burst() -> list:
        return await asyncio.gather(
            cascade.predict(rows(1)), cascade.predict(rows(0, 1)), cascade.predict(rows(0))
        )

    first, second, third = asyncio.run(burst())
    assert handle.calls == [(1, ""), (3, "")]  # the first alone, the others together
    assert [p.tier for p in first] == ["cheap"]
    assert [p.tier for p in second] == ["expensive", "cheap"]
    assert [p.tier for p in third] == ["expensive"]
    assert (costs.call_rows["cheap"], costs.call_rows["expensive"]) == (4, 2)
    assert costs.call_seconds["expensive"] > 0 and not degraded


def test_degraded_answers_are_counted_at_the_ingress_but_a_shadow_copy_is_not() -> None:
    handle = CheapTierHandle(Tiers(expensive_fails=True).escalation())
    costs, degraded = CostMeter(), []
    cascade = remote_cascade(handle, costs, degraded)
    shadow = CascadeRoute("7", "digits-cheap/4", "digits-exp/5", threshold=0.7)
    routed = RoutedCascade("7", cascade_fn(handle, lambda: shadow, retry_wait_s=0))

    asyncio.run(cascade.predict(rows(0, 0, 1)))
    assert degraded == [(2, "unavailable")]
    (mirrored,) = asyncio.run(cascade.predict(rows(0), routed, record=False))
    assert handle.calls[-1] == (1, "7") and mirrored.degraded
    assert degraded == [(2, "unavailable")] and costs.call_rows["cheap"] == 3


def test_the_cheap_tier_at_capacity_is_a_503_not_a_500() -> None:
    from ray.serve.exceptions import BackPressureError

    class Refusing(CheapTierHandle):
        def remote(self, *args: object):  # noqa: ANN202
            raise BackPressureError(num_queued_requests=9, max_queued_requests=8)

    cascade = remote_cascade(Refusing(Tiers().escalation()), CostMeter(), [])
    with pytest.raises(ServiceUnavailable, match="cheap tier is at capacity"):
        asyncio.run(cascade.predict(rows(0)))


def test_predictions_leave_no_garbage_for_the_cyclic_collector() -> None:
    """Under load the ingress makes ~100 tier calls a second. Garbage in reference
    cycles from each (tenacity's retry state was ~30 objects) made the collector pause
    the ingress, and every request in it, for 25-80 ms every ~12 s
    (bench/results/2026-11-29-serve.md). Here: 200 predictions, 10 at a time, half of
    them escalated, through the ingress's coalesced calls and the cheap tier's cascade."""
    handle = CheapTierHandle(Tiers().escalation())
    cascade = remote_cascade(handle, CostMeter(), [])

    async def predictions() -> int:
        gc.collect()
        gc.disable()  # count what they leave, not what a collection mid-way freed
        try:
            for _ in range(20):
                await asyncio.gather(*(cascade.predict(rows(i % 2)) for i in range(10)))
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(predictions()) < 20  # with tenacity: ~4,500
