"""The cascade's protection of the expensive tier: timeout and circuit breaker (no Ray)."""

from __future__ import annotations

import asyncio

import numpy as np

from app.errors import ServiceUnavailable
from serve_graphs.cascade import Cascade, CircuitBreaker, TierAnswer
from tests.conftest import FakeClock

UNSURE = np.array([[0.6, 0.4]])  # below any threshold we use: always escalates


def test_the_breaker_opens_after_failures_lets_one_trial_through_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures_to_open=2, reset_after_s=10, clock=clock)
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert (breaker.state, breaker.allow()) == ("open", False)
    clock.now = 10
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record_failure()  # the trial failed: open again, for another 10 s
    assert (breaker.state, breaker.allow()) == ("open", False)
    clock.now = 20
    assert breaker.allow()
    breaker.record_success()
    assert (breaker.state, breaker.failures) == ("closed", 0)


def cascade_with(expensive, **kwargs) -> tuple[Cascade, list[tuple[int, str]], list[int]]:  # noqa: ANN001
    cheap_calls: list[int] = []
    degraded: list[tuple[int, str]] = []

    async def cheap(x: np.ndarray) -> TierAnswer:
        cheap_calls.append(len(x))
        return TierAnswer(np.repeat(UNSURE, len(x), axis=0), "digits-cheap/1")

    cascade = Cascade(
        cheap, expensive, 0.9, on_degraded=lambda n, r: degraded.append((n, r)), **kwargs
    )
    return cascade, degraded, cheap_calls


def test_a_slow_expensive_tier_times_out_into_a_degraded_answer() -> None:
    async def slow(x: np.ndarray) -> TierAnswer:
        await asyncio.sleep(5)
        raise AssertionError("never reached")

    cascade, degraded, _ = cascade_with(slow, expensive_timeout_s=0.05)
    (answer,) = asyncio.run(cascade.predict(np.zeros((1, 2))))
    assert (answer.tier, answer.degraded, answer.label) == ("cheap", True, 0)
    assert degraded == [(1, "timeout")]


def test_an_open_breaker_stops_calling_the_failing_tier() -> None:
    calls: list[int] = []

    async def failing(x: np.ndarray) -> TierAnswer:
        calls.append(len(x))
        raise ServiceUnavailable("the expensive tier could not answer")

    breaker = CircuitBreaker(failures_to_open=3, reset_after_s=60)
    cascade, degraded, _ = cascade_with(failing, breaker=breaker)
    for _ in range(5):
        asyncio.run(cascade.predict(np.zeros((1, 2))))
    assert len(calls) == 3  # the 4th and 5th requests never reached it
    assert [r for _, r in degraded] == ["unavailable"] * 3 + ["breaker_open"] * 2


def test_a_cancelled_trial_call_does_not_leave_the_breaker_stuck_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures_to_open=1, reset_after_s=10, clock=clock)
    started = asyncio.Event()

    async def hanging(x: np.ndarray) -> TierAnswer:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("never reached")

    cascade, _, _ = cascade_with(hanging, breaker=breaker, expensive_timeout_s=30)
    breaker.record_failure()  # open
    clock.now = 10  # half-open: the next call is the trial

    async def cancel_the_trial() -> None:
        task = asyncio.create_task(cascade.predict(np.zeros((1, 2))))
        await started.wait()
        task.cancel()  # the client went away mid-trial
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancel_the_trial())
    assert breaker.state == "half-open" and breaker.allow()  # the next request may try


def test_during_a_swap_each_cheap_version_is_judged_by_its_own_threshold() -> None:
    """A new cascade reaches the ingress and the cheap tier's replicas at different
    moments; an answer of the outgoing version keeps the threshold calibrated for it."""
    answering = {"version": "digits-cheap/1"}

    async def cheap(instances: np.ndarray) -> TierAnswer:
        return TierAnswer(np.array([[0.7, 0.3]]), answering["version"])

    async def expensive(instances: np.ndarray) -> TierAnswer:
        return TierAnswer(np.array([[0.1, 0.9]]), "digits-expensive/1")

    cascade = Cascade(cheap, expensive, threshold=1.0)
    cascade.calibrated("digits-cheap/1", 0.6)  # 0.7 is sure enough for version 1
    cascade.calibrated("digits-cheap/2", 0.8)  # not for version 2
    tier = lambda: asyncio.run(cascade.predict(np.zeros((1, 4))))[0].tier  # noqa: E731
    assert tier() == "cheap"  # version 1 still answers: its own threshold
    answering["version"] = "digits-cheap/2"
    assert tier() == "expensive"
    cascade.calibrated("digits-cheap/3", 0.5)  # only the last two versions are kept
    assert set(cascade.thresholds) == {"digits-cheap/2", "digits-cheap/3"}


def test_a_shared_calls_time_is_charged_to_the_cost_not_the_wait() -> None:
    """A tier answer that carries its rows' share of a coalesced call's time is what the
    cost report gets; an answer without one is charged the whole wait."""

    async def expensive(x: np.ndarray) -> TierAnswer:
        await asyncio.sleep(0.05)  # waited for a slot and the call: not this row's cost
        return TierAnswer(np.array([[0.1, 0.9]] * len(x)), "digits-expensive/1", seconds=0.002)

    calls: list[tuple[str, int, float]] = []
    cascade, _, _ = cascade_with(expensive, on_tier_call=lambda *c: calls.append(c))
    asyncio.run(cascade.predict(np.zeros((1, 2))))
    (cheap_tier, cheap_rows, cheap_s), (tier, rows, seconds) = calls
    assert (cheap_tier, cheap_rows, tier, rows, seconds) == ("cheap", 1, "expensive", 1, 0.002)
    assert 0 <= cheap_s < 0.05  # no share given: the whole (short) wait
