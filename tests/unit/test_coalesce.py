"""The ingress's coalescing of tier calls (Ray-free: the tier is an async function)."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest

from app.errors import Overloaded, ServiceUnavailable
from serve_graphs.decide.breaker import CircuitBreaker
from serve_graphs.decide.cascade import TierAnswer, call_of
from serve_graphs.decide.coalesce import Coalescer


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


def coalescer(
    tier: Tier,
    in_flight: int = 1,
    max_rows: int = 64,
    timeout: float = 5.0,
    max_waiting_rows: int = 1024,
) -> Coalescer:
    return Coalescer(
        tier,
        max_in_flight=in_flight,
        max_rows=max_rows,
        max_waiting_rows=max_waiting_rows,
        timeout_s=timeout,
    )


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
    c = Coalescer(
        tier, max_in_flight=lambda: 2 * replicas[0], max_rows=1, max_waiting_rows=64, timeout_s=5
    )
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
    none_running = Coalescer(
        Tier(), max_in_flight=lambda: 0, max_rows=1, max_waiting_rows=64, timeout_s=5
    )
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
async def test_a_call_that_never_returns_frees_its_slot_once_its_callers_deadline_passes():
    """The combined call has no deadline of its own: its callers have theirs, and once
    they have all given up the call is cancelled."""
    tier = Tier()
    tier.gate.clear()  # never opened: the tier hangs
    c = coalescer(tier, timeout=0.05)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c(rows(0.1)), 1)
    await asyncio.sleep(0.01)  # the cancelled call's task ends
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
        c = Coalescer(tier, max_in_flight=1, max_rows=64, max_waiting_rows=64, timeout_s=1)
        frames = [pd.DataFrame({"x": [0.1, 0.2]}), pd.DataFrame({"x": [0.7]}, index=[5])]
        return await asyncio.gather(*(c(f) for f in frames))

    first, second = asyncio.run(run())
    np.testing.assert_allclose(first.probs[:, 0], [0.1, 0.2])
    np.testing.assert_allclose(second.probs[:, 0], [0.7])


@in_loop
async def test_one_failed_call_is_one_breaker_failure_however_many_requests_it_carried():
    """Each caller gets its own copy of the failure, naming the call; the breaker counts
    the call once, so one bad call of five requests does not open a 2-failure breaker."""
    from serve_graphs.decide.cascade import Cascade, CascadeRoute

    expensive = Tier(fail=ServiceUnavailable("the expensive tier could not answer"))
    expensive.gate.clear()
    coalesced = coalescer(expensive)

    async def cheap(x: np.ndarray, model_id: str | None) -> TierAnswer:
        return TierAnswer(np.tile([0.6, 0.4], (len(x), 1)), "cheap/1")  # always escalates

    cascade = Cascade(cheap, lambda model_id: coalesced, breaker_failures=2, breaker_reset_s=60)
    route = CascadeRoute("3", None, None, threshold=0.9)
    first = asyncio.create_task(cascade(rows(0.5), route))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(cascade(rows(0.5), route)) for _ in range(5)]
    await asyncio.sleep(0)
    expensive.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *rest), 1)
    assert all(a.predictions[0].degraded for a in answers)
    assert {a.degraded_reason for a in answers} == {"unavailable"}
    assert expensive.calls == [1, 5]
    breaker = cascade.breakers["3"]
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
        for task in list(c._calls):
            task.cancel()
        try:
            await asyncio.wait_for(waiter, 1)
        except asyncio.CancelledError:
            return True, c.in_flight
        return False, c.in_flight

    assert asyncio.run(scenario()) == (True, 0)


@in_loop
async def test_past_the_waiting_bound_a_request_is_refused_at_once_and_the_waiters_answered():
    """All call slots busy and max_waiting_rows rows waiting: the next request is shed
    with Overloaded at once, not left to wait out its deadline."""
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier, in_flight=1, timeout=5.0, max_waiting_rows=4)
    loop = asyncio.get_running_loop()
    out = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)  # out, held by the gate
    waiting = [asyncio.create_task(c(rows(v, v))) for v in (0.2, 0.3)]  # 4 rows wait
    await asyncio.sleep(0)
    assert c.waiting_rows == 4
    started = loop.time()
    with pytest.raises(Overloaded, match="called tier is at capacity"):
        await c(rows(0.4))
    assert loop.time() - started < 0.5  # at once, well under the 5 s deadline
    tier.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(out, *waiting), 1)
    assert tier.calls == [1, 4]  # the refused row was never sent
    np.testing.assert_allclose(answers[1].probs[:, 0], [0.2, 0.2])
    np.testing.assert_allclose(answers[2].probs[:, 0], [0.3, 0.3])
    assert c.waiting_rows == 0


@in_loop
async def test_waiters_that_gave_up_stop_counting_against_the_waiting_bound():
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier, in_flight=1, timeout=5.0, max_waiting_rows=4)
    out = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    quitters = [asyncio.create_task(c(rows(0.2, 0.2))) for _ in range(2)]  # 4 rows wait
    await asyncio.sleep(0)
    for q in quitters:
        q.cancel()  # their clients left
    await asyncio.gather(*quitters, return_exceptions=True)
    assert c.waiting_rows == 0  # at once, not only when the slot frees
    tier.gate.set()
    await asyncio.wait_for(out, 1)  # the slot frees: the quitters are dropped, not sent
    assert (tier.calls, c.waiting_rows, len(c.waiting)) == ([1], 0, 0)

    tier.gate.clear()
    busy = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    let_in = asyncio.create_task(c(rows(0.5, 0.5, 0.5, 0.5)))  # the bound is free again
    await asyncio.sleep(0)
    tier.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(busy, let_in), 1)
    assert [len(a) for a in answers] == [1, 4] and tier.calls == [1, 1, 4]


@in_loop
async def test_a_request_larger_than_the_waiting_bound_gets_in_when_nobody_waits():
    """max_instances_per_request may exceed the bound: such a request is not refused
    for ever under load, only when others already wait."""
    tier = Tier()
    tier.gate.clear()
    c = coalescer(tier, in_flight=1, timeout=5.0, max_waiting_rows=4)
    busy = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    large = asyncio.create_task(c(rows(*[0.5] * 10)))  # alone in the wait: let in
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await c(rows(0.2))  # behind it: shed
    tier.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(busy, large), 1)
    assert [len(a) for a in answers] == [1, 10]


@in_loop
async def test_a_caller_past_its_deadline_is_told_which_call_it_waited_on():
    """Callers riding one call that never returns each get a TimeoutError of their own
    naming that call; a caller still waiting for a slot names the call holding it."""
    tier = Tier()
    tier.gate.clear()  # the tier hangs
    c = coalescer(tier, in_flight=1, timeout=0.1)
    first = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    riders = [asyncio.create_task(c(rows(0.2))) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()  # its client left: its call is cancelled, and the riders go as one
    await asyncio.sleep(0.01)
    assert tier.calls == [1, 3]
    (ridden,) = c._calls.values()
    errors = await asyncio.wait_for(asyncio.gather(*riders, return_exceptions=True), 1)
    assert all(isinstance(e, TimeoutError) for e in errors)
    assert all(call_of(e) is ridden for e in errors)
    assert len({id(e) for e in errors}) == 3  # a copy each

    # A caller that never got a slot blames the call out that held it.
    holder = asyncio.create_task(c(rows(0.3)))  # deadline 0.1 s, as every caller's
    await asyncio.sleep(0)
    (held_by,) = c._calls.values()
    c.timeout_s = 0.02  # this caller's deadline passes first, while it still waits
    with pytest.raises(TimeoutError) as waited:
        await c(rows(0.4))
    assert call_of(waited.value) is held_by
    assert tier.calls == [1, 3, 1]  # its row was never sent
    with pytest.raises(TimeoutError):
        await holder


@in_loop
async def test_one_slow_call_of_five_requests_is_one_breaker_failure_two_slow_calls_open_it():
    tier = Tier()
    tier.gate.clear()  # the tier hangs
    c = coalescer(tier, in_flight=1, timeout=0.1)
    breaker = CircuitBreaker(failures_to_open=2, reset_after_s=60)

    async def timed_out(tasks: list[asyncio.Task]) -> None:
        for error in await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1):
            assert isinstance(error, TimeoutError)
            breaker.record_failure(call_of(error))

    first = asyncio.create_task(c(rows(0.1)))
    await asyncio.sleep(0)
    five = [asyncio.create_task(c(rows(0.2))) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()  # the five go out as one call, which hangs
    await asyncio.gather(first, return_exceptions=True)
    await timed_out(five)
    assert tier.calls == [1, 5]
    assert (breaker.failures, breaker.state) == (1, "closed")  # one call, not five requests

    await timed_out([asyncio.create_task(c(rows(0.3)))])  # another call, slow too
    assert (breaker.failures, breaker.state) == (2, "open")
