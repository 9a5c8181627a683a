"""The whole serving path without Ray, as the deployments wire it (tests/unit/graph.py):
the ingress's CascadeCaller, one coalesced call to the cheap tier's replica, the
cascade there, one coalesced call on to the expensive tier's replica, and the forward
passes of both tiers' models."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from app.errors import Overloaded, ServiceUnavailable
from app.sections import ServeConfig
from serve_graphs.api.observe import CostMeter
from serve_graphs.decide.tier import TierRunner
from tests.unit.graph import Graph, graph


class Model:
    """Sure of a row (0.9 for label 0) when its first feature is 1, unsure (0.6)
    otherwise; ``label`` for the expensive tier's answers; can fail or be slow."""

    def __init__(self, label: int | None = None) -> None:
        self.label = label
        self.fail: Exception | None = None
        self.passes: list[int] = []

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        self.passes.append(len(rows))
        if self.fail is not None:
            raise self.fail
        if self.label is not None:
            return np.tile([[0.01, 0.99]], (len(rows), 1))
        sure = rows[:, 0] == 1
        return np.where(sure[:, None], [[0.9, 0.1]], [[0.6, 0.4]])


def two_tiers(**kwargs: object) -> tuple[Graph, CostMeter, list[tuple[int, str]]]:
    cheap, expensive = Model(), Model(label=1)
    g = graph(
        TierRunner(cheap, "digits-cheap/1"),
        TierRunner(expensive, "digits-exp/1"),
        threshold=0.7,
        cheap_routed={"digits-cheap/4": TierRunner(Model(), "digits-cheap/4")},
        expensive_routed={"digits-exp/5": TierRunner(Model(label=1), "digits-exp/5")},
        **kwargs,
    )
    costs, degraded = CostMeter(), []
    g.caller.on_tier_call = costs.tier_call
    g.caller.on_degraded = lambda n, reason: degraded.append((n, reason))
    return g, costs, degraded


def rows(*first: int) -> np.ndarray:
    return np.array([[f, 0.0] for f in first])


def test_concurrent_requests_go_as_one_call_and_each_gets_its_own_answers_and_costs() -> None:
    g, costs, degraded = two_tiers(cfg=ServeConfig(tier_calls_in_flight=1))

    async def burst() -> list:
        return await asyncio.gather(
            g.caller.predict(rows(1)), g.caller.predict(rows(0, 1)), g.caller.predict(rows(0))
        )

    first, second, third = asyncio.run(burst())
    cascade_calls = [rows for method, rows in g.cheap_handle.calls if method == "cascade"]
    assert cascade_calls == [1, 3]  # the first alone, the others together
    assert [p.tier for p in first] == ["cheap"]
    assert [p.tier for p in second] == ["expensive", "cheap"]
    assert [p.tier for p in third] == ["expensive"]
    assert (costs.call_rows["cheap"], costs.call_rows["expensive"]) == (4, 2)
    assert costs.call_seconds["expensive"] > 0 and not degraded
    assert g.expensive.runner.model.passes == [2]  # both unsure rows in one forward pass


def test_a_routed_version_runs_its_own_models_on_both_tiers() -> None:
    g, _, _ = two_tiers()
    routed = g.route_to("7", "digits-cheap/4", "digits-exp/5", threshold=0.95)
    predictions = asyncio.run(g.caller.predict(rows(1, 0), routed))
    assert {p.model_version for p in predictions} == {"digits-exp/5"}  # 0.9 < 0.95
    assert g.cheap.runner.model.passes == []  # the pinned version was not asked


def test_degraded_answers_are_counted_at_the_ingress_but_a_shadow_copy_is_not() -> None:
    g, costs, degraded = two_tiers()
    g.expensive.runner.model.fail = ServiceUnavailable("the expensive tier is away")
    asyncio.run(g.caller.predict(rows(0, 0, 1)))
    assert degraded == [(2, "unavailable")]
    shadow = g.route_to("7", "digits-cheap/4", "digits-exp/1", threshold=0.7)
    (mirrored,) = asyncio.run(g.caller.predict(rows(0), shadow, record=False))
    assert mirrored.degraded
    assert degraded == [(2, "unavailable")] and costs.call_rows["cheap"] == 3


def test_a_slow_expensive_tier_answers_degraded_within_its_timeout() -> None:
    g, _, degraded = two_tiers(cfg=ServeConfig(expensive_timeout_s=0.1))
    g.expensive_handle.delay_s[None] = 2.0

    async def timed() -> tuple[list, float]:
        started = asyncio.get_running_loop().time()
        answer = await g.caller.predict(rows(0, 1))
        return answer, asyncio.get_running_loop().time() - started

    answer, seconds = asyncio.run(timed())
    assert [(p.tier, p.degraded) for p in answer] == [("cheap", True), ("cheap", False)]
    assert degraded == [(1, "timeout")] and seconds < 1.0


def test_the_cheap_tier_at_capacity_is_a_503_not_a_500() -> None:
    from ray.serve.exceptions import BackPressureError

    g, _, _ = two_tiers()

    async def refuse(*args: object) -> None:
        raise BackPressureError(num_queued_requests=9, max_queued_requests=8)

    g.cheap.cascade = refuse
    with pytest.raises(ServiceUnavailable, match="cheap tier is at capacity"):
        asyncio.run(g.caller.predict(rows(0)))


def test_a_saturated_cheap_tier_sheds_at_once_past_the_waiting_bound() -> None:
    """The ingress keeps serve.tier_calls_in_flight calls out; past that, at most
    serve.tier_max_waiting_rows rows wait, and the next request is refused at once."""
    cfg = ServeConfig(tier_calls_in_flight=1, tier_max_waiting_rows=4, request_timeout_s=5)
    g, _, _ = two_tiers(cfg=cfg)
    g.cheap_handle.delay_s[None] = 1.0  # the call out takes a while

    async def burst() -> tuple[list, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = loop.create_task(g.caller.predict(rows(1)))  # goes out
        await asyncio.sleep(0.01)
        waiting = [loop.create_task(g.caller.predict(rows(1, 1))) for _ in range(2)]  # 4 rows
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="cheap tier is at capacity"):
            await g.caller.predict(rows(1))
        shed_after = loop.time() - started
        answers = await asyncio.gather(out, *waiting)
        return answers, shed_after

    answers, shed_after = asyncio.run(burst())
    assert shed_after < 0.5  # at once, not after the 1 s call or the request timeout
    assert [len(a) for a in answers] == [1, 2, 2]  # those let in are all answered


def test_predictions_leave_no_garbage_for_the_cyclic_collector() -> None:
    """Under load the ingress makes ~100 tier calls a second. Garbage in reference
    cycles from each (tenacity's retry state was ~30 objects) made the collector pause
    the ingress, and every request in it, for 25-80 ms every ~12 s
    (bench/results/2026-11-29-serve.md). Here: 200 predictions, 10 at a time, half of
    them escalated, through the ingress's coalesced calls and the cheap tier's cascade.
    (The stand-in handle itself allocates none in cycles.)"""
    g, _, _ = two_tiers()

    async def predictions() -> int:
        await g.caller.predict(rows(0))  # warm: the callers and breakers are made once
        gc.collect()
        gc.disable()  # count what they leave, not what a collection mid-way freed
        try:
            for _ in range(20):
                await asyncio.gather(*(g.caller.predict(rows(i % 2)) for i in range(10)))
            return gc.collect()
        finally:
            gc.enable()

    # Fewer than one object per two predictions (with tenacity: ~4,500). The collector
    # also counts what other threads of the test process left meanwhile: once, in a
    # full xdist run, 24 (this file alone: under 20).
    assert asyncio.run(predictions()) < 100
