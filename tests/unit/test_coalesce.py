"""The ingress's coalescing of tier calls (Ray-free: the tier is an async function)."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest

from app.errors import ServiceUnavailable
from serve_graphs.cascade import TierAnswer
from serve_graphs.coalesce import Coalescer


def in_loop(test):  # noqa: ANN001, ANN201 - the project runs coroutines with asyncio.run
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class Tier:
    """A tier that answers row i with probabilities [x, 1 - x] of its first feature, and
    records the rows of each call; ``gate`` holds calls until the test releases them."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail

    async def __call__(self, instances: np.ndarray) -> TierAnswer:
        self.calls.append(len(instances))
        await self.gate.wait()
        if self.fail:
            raise self.fail
        x = instances[:, :1]
        return TierAnswer(np.hstack([x, 1 - x]), "3")


def rows(*values: float) -> np.ndarray:
    return np.array([[v, 0.0] for v in values])


def coalescer(tier: Tier, in_flight: int = 1, max_rows: int = 64, timeout: float = 5.0):
    return Coalescer(tier, max_in_flight=in_flight, max_rows=max_rows, call_timeout_s=timeout)


@in_loop
async def test_a_lone_call_goes_out_at_once_and_alone():
    tier = Tier()
    answer = await asyncio.wait_for(coalescer(tier)(rows(0.25)), 1)
    assert tier.calls == [1]
    assert answer.version == "3"
    np.testing.assert_allclose(answer.probs, [[0.25, 0.75]])


@in_loop
async def test_calls_arriving_while_one_is_out_go_together_and_each_gets_its_own_rows():
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier)
    first = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)  # the first call is out, held by the gate
    waiting = [asyncio.create_task(c(rows(v / 10, v / 10 + 0.05))) for v in range(2, 6)]
    await asyncio.sleep(0)
    tier.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *waiting), 1)
    assert tier.calls == [1, 8]  # the four waiting requests in one call
    # The call's time is shared by rows: the four 2-row shares add up to one call.
    shares = [a.seconds for a in answers[1:]]
    assert all(s is not None and s > 0 for s in shares)
    assert max(shares) == pytest.approx(min(shares))
    for v, answer in zip(range(2, 6), answers[1:], strict=True):
        np.testing.assert_allclose(answer.probs[:, 0], [v / 10, v / 10 + 0.05])
    np.testing.assert_allclose(answers[0].probs[:, 0], [0.1])


@in_loop
async def test_a_combined_call_holds_at_most_max_rows_but_always_one_request():
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier, max_rows=4)
    first = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(c(rows(*[0.5] * n))) for n in (3, 2, 6)]
    await asyncio.sleep(0)
    tier.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 1)
    assert tier.calls == [1, 3, 2, 6]  # 3 + 2 > 4 rows; a 6-row request goes alone


@in_loop
async def test_calls_in_flight_are_capped_and_the_rest_wait():
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier, in_flight=2)
    tasks = [asyncio.create_task(c(rows(0.5))) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert tier.calls == [1, 1]  # two out; three wait for a slot
    tier.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert tier.calls == [1, 1, 3]


@in_loop
async def test_the_cap_can_follow_the_tiers_replicas_and_a_new_replica_gets_calls_at_once():
    tier = Tier()
    tier.gate.clear()
    replicas = [1]
    c = Coalescer(tier, max_in_flight=lambda: 2 * replicas[0], max_rows=1, call_timeout_s=5)
    tasks = [asyncio.create_task(c(rows(0.5))) for _ in range(6)]
    await asyncio.sleep(0.01)
    assert tier.calls == [1, 1]
    replicas[0] = 2  # the tier scaled out: the next request lets two more calls out
    tasks.append(asyncio.create_task(c(rows(0.5))))
    await asyncio.sleep(0.01)
    assert tier.calls == [1, 1, 1, 1]
    tier.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert len(tier.calls) == 7
    # No replica running (scaled to zero): one call still goes, and cold-starts one.
    none_running = Coalescer(Tier(), max_in_flight=lambda: 0, max_rows=1, call_timeout_s=5)
    assert (await asyncio.wait_for(none_running(rows(0.5)), 1)).version == "3"


@in_loop
async def test_a_failed_call_fails_every_request_in_it_and_the_next_calls_still_go():
    tier = Tier(fail=ServiceUnavailable("the cheap tier is at capacity"))
    tier.gate.clear()
    c = coalescer(tier)
    tasks = [asyncio.create_task(c(rows(0.5))) for _ in range(3)]
    await asyncio.sleep(0)
    tier.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1)
    assert all(isinstance(r, ServiceUnavailable) for r in results)
    tier.fail = None
    answer = await asyncio.wait_for(c(rows(0.5)), 1)
    np.testing.assert_allclose(answer.probs, [[0.5, 0.5]])


@in_loop
async def test_a_caller_that_gives_up_is_left_out_and_the_others_are_answered():
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier)
    first = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(c(rows(0.2)))
    stayer = asyncio.create_task(c(rows(0.3)))
    await asyncio.sleep(0)
    quitter.cancel()
    tier.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, stayer), 1)
    assert tier.calls == [1, 1]  # the cancelled request's row was never sent
    np.testing.assert_allclose(answers[1].probs[:, 0], [0.3])
    with pytest.raises(asyncio.CancelledError):
        await quitter


@in_loop
async def test_a_call_that_never_returns_frees_its_slot_after_the_call_timeout():
    tier = Tier()
    tier.gate.clear()  # never opened: the tier hangs
    c = coalescer(tier, timeout=0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c(rows(0.1)), 1)
    assert c.in_flight == 0
    tier.gate.set()
    answer = await asyncio.wait_for(c(rows(0.4)), 1)
    np.testing.assert_allclose(answer.probs[:, 0], [0.4])


def test_frames_of_records_are_combined_and_split_by_position():
    import pandas as pd

    async def tier(frame: pd.DataFrame) -> TierAnswer:
        assert list(frame.index) == list(range(len(frame)))
        x = frame[["x"]].to_numpy()
        return TierAnswer(np.hstack([x, 1 - x]), "1")

    async def run() -> list[TierAnswer]:
        c = Coalescer(tier, max_in_flight=1, max_rows=64, call_timeout_s=1)
        frames = [pd.DataFrame({"x": [0.1, 0.2]}), pd.DataFrame({"x": [0.7]}, index=[5])]
        return await asyncio.gather(*(c(f) for f in frames))

    first, second = asyncio.run(run())
    np.testing.assert_allclose(first.probs[:, 0], [0.1, 0.2])
    np.testing.assert_allclose(second.probs[:, 0], [0.7])


@in_loop
async def test_one_failed_call_is_one_breaker_failure_however_many_requests_it_carried():
    """Each caller gets its own copy of the failure, naming the call; the breaker counts
    the call once, so one bad call of five requests does not open a 2-failure breaker."""
    from serve_graphs.cascade import Cascade, CircuitBreaker, call_of

    expensive = Tier(fail=ServiceUnavailable("the expensive tier could not answer"))
    expensive.gate.clear()
    coalesced = coalescer(expensive)

    async def cheap(x: np.ndarray) -> TierAnswer:
        return TierAnswer(np.tile([0.6, 0.4], (len(x), 1)), "cheap/1")  # always escalates

    breaker = CircuitBreaker(failures_to_open=2, reset_after_s=60)
    cascade = Cascade(cheap, coalesced, threshold=0.9, breaker=breaker)
    first = asyncio.create_task(cascade.predict(rows(0.5)))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(cascade.predict(rows(0.5))) for _ in range(5)]
    await asyncio.sleep(0)
    expensive.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *rest), 1)
    assert all(a[0].degraded for a in answers)
    assert expensive.calls == [1, 5]
    assert (breaker.failures, breaker.state) == (2, "open")  # two calls, not six requests

    expensive.gate.clear()
    alone = asyncio.create_task(coalesced(rows(0.5)))
    await asyncio.sleep(0)
    together = [asyncio.create_task(coalesced(rows(0.5))) for _ in range(3)]
    await asyncio.sleep(0)
    expensive.gate.set()
    errors = await asyncio.wait_for(asyncio.gather(alone, *together, return_exceptions=True), 1)
    shared = errors[1:]
    assert len({id(e) for e in shared}) == 3  # a copy each: tracebacks stay apart
    assert len({id(call_of(e)) for e in shared}) == 1 and call_of(errors[0]) is not None
    assert call_of(errors[0]) is not call_of(shared[0])


@in_loop
async def test_a_call_nobody_waits_for_any_more_is_cancelled_and_frees_its_slot():
    tier = Tier()
    tier.gate.clear()  # the tier hangs
    c = coalescer(tier, timeout=60)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c(rows(0.1)), 0.05)  # the caller gives up
    await asyncio.sleep(0.01)
    assert c.in_flight == 0  # the call was cancelled with its only caller
    tier.gate.set()
    answer = await asyncio.wait_for(c(rows(0.4)), 1)
    np.testing.assert_allclose(answer.probs[:, 0], [0.4])


@in_loop
async def test_the_combined_call_runs_in_a_context_of_its_own():
    """Serve cancels a request's child calls with it; a combined call must be no one
    request's child, so it cannot see (or be tied to) any caller's context."""
    import contextvars

    seen = contextvars.ContextVar("seen", default="none")
    inside: list[str] = []

    async def tier(x: np.ndarray) -> TierAnswer:
        inside.append(seen.get())
        return TierAnswer(np.zeros((len(x), 2)), "1")

    async def caller(c: Coalescer) -> None:
        seen.set("request-1")
        await c(rows(0.1))

    await asyncio.wait_for(caller(coalescer(tier)), 1)
    assert inside == ["none"]


@in_loop
async def test_a_tier_answer_with_the_wrong_number_of_rows_fails_every_caller_clearly():
    async def short(x: np.ndarray) -> TierAnswer:
        return TierAnswer(np.zeros((len(x) - 1, 2)), "1")

    with pytest.raises(RuntimeError, match="answered 1 rows of 2"):
        await asyncio.wait_for(coalescer(short)(rows(0.1, 0.2)), 1)


def test_a_call_cancelled_before_it_started_releases_its_callers_and_slot():
    async def scenario() -> tuple[bool, int]:
        tier = Tier()
        c = coalescer(tier)
        waiter = asyncio.create_task(c(rows(0.1)))
        await asyncio.sleep(0)  # the call's task exists but has not run yet
        for task in list(c._tasks):
            task.cancel()
        try:
            await asyncio.wait_for(waiter, 1)
        except asyncio.CancelledError:
            return True, c.in_flight
        return False, c.in_flight

    assert asyncio.run(scenario()) == (True, 0)
