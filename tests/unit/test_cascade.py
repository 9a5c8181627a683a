"""The cascade the cheap tier runs, and its protection of the expensive tier: the
decision, the timeout and the circuit breaker (no Ray: the tiers are async functions,
the expensive one behind the same coalesced caller the cheap tier uses)."""

from __future__ import annotations

import asyncio

import numpy as np

from app.errors import Overloaded, ServiceUnavailable, TierError
from serve_graphs.decide.breaker import CircuitBreaker
from serve_graphs.decide.cascade import Cascade, CascadeRoute, TierAnswer
from serve_graphs.decide.coalesce import Coalescer
from tests.conftest import FakeClock

DEPLOYED = CascadeRoute("3", None, None, threshold=0.7, thresholds={"digits-cheap/1": 0.7})


class Tiers:
    """A cheap tier sure of a row (0.9) when its first feature is 1, unsure (0.6)
    otherwise, per model id; an expensive tier that answers label 1 at 0.99, or fails
    with ``fail``, or takes ``delay_s`` (``first_delay_s`` on its first call)."""

    def __init__(
        self,
        fail: Exception | None = None,
        delay_s: float = 0.0,
        first_delay_s: float | None = None,
    ) -> None:
        self.cheap_calls: list[tuple[int, str | None]] = []
        self.expensive_calls: list[tuple[int, str | None]] = []
        self.fail, self.delay_s = fail, delay_s
        self.first_delay_s = delay_s if first_delay_s is None else first_delay_s

    async def cheap(self, rows: np.ndarray, model_id: str | None) -> TierAnswer:
        self.cheap_calls.append((len(rows), model_id))
        sure = rows[:, 0] == 1
        probs = np.where(sure[:, None], [[0.9, 0.1]], [[0.6, 0.4]])
        return TierAnswer(probs, model_id or "digits-cheap/1")

    def expensive(self, model_id: str | None, timeout_s: float = 5.0) -> Coalescer:
        async def call(rows: np.ndarray) -> TierAnswer:
            self.expensive_calls.append((len(rows), model_id))
            delay_s = self.delay_s if len(self.expensive_calls) > 1 else self.first_delay_s
            if delay_s:
                await asyncio.sleep(delay_s)
            if self.fail is not None:
                raise self.fail
            return TierAnswer(np.tile([[0.01, 0.99]], (len(rows), 1)), model_id or "digits-exp/1")

        return Coalescer(
            call, max_in_flight=1, max_rows=64, max_waiting_rows=64, timeout_s=timeout_s
        )

    def cascade(self, timeout_s: float = 5.0, failures: int = 2, clock=None) -> Cascade:  # noqa: ANN001
        return Cascade(
            self.cheap,
            lambda model_id: self.expensive(model_id, timeout_s),
            breaker_failures=failures,
            breaker_reset_s=60,
            **({"clock": clock} if clock else {}),
        )


def rows(*first: int) -> np.ndarray:
    return np.array([[f, 0.0] for f in first])


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


def test_one_shared_call_counts_once_however_its_failures_interleave() -> None:
    breaker = CircuitBreaker(failures_to_open=3, reset_after_s=10)
    a, b = object(), object()
    for call in (a, b, a, b, a):  # two calls' requests failing in turn
        breaker.record_failure(call)
    assert (breaker.failures, breaker.state) == (2, "closed")


def test_the_cheap_tier_escalates_only_the_rows_it_is_unsure_of() -> None:
    tiers = Tiers()
    answer = asyncio.run(tiers.cascade()(rows(1, 0, 1, 0), DEPLOYED))
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
    answer = asyncio.run(tiers.cascade()(rows(1, 0), route))
    assert tiers.cheap_calls == [(2, "digits-cheap/4")]
    assert tiers.expensive_calls == [(2, "digits-exp/5")]  # 0.9 is unsure at 0.95
    assert {p.model_version for p in answer.predictions} == {"digits-exp/5"}


def test_answers_of_a_swapped_out_cheap_version_are_judged_by_its_own_threshold() -> None:
    """A new cascade reaches the ingress and the cheap tier's replicas at different
    moments; an answer of the outgoing version keeps the threshold calibrated for it."""
    tiers = Tiers()
    swap = CascadeRoute("4", None, None, 0.5, {"digits-cheap/1": 0.95, "digits-cheap/2": 0.5})
    asyncio.run(tiers.cascade()(rows(1), swap))
    assert tiers.expensive_calls == [(1, None)]  # digits-cheap/1 answered: 0.9 < 0.95


def test_a_slow_expensive_tier_times_out_into_a_degraded_answer() -> None:
    tiers = Tiers(delay_s=5)
    answer = asyncio.run(tiers.cascade(timeout_s=0.05)(rows(0), DEPLOYED))
    (p,) = answer.predictions
    assert (p.tier, p.degraded, p.label, answer.degraded_reason) == ("cheap", True, 0, "timeout")


def test_a_failing_expensive_tier_degrades_and_its_breaker_opens_per_version() -> None:
    tiers = Tiers(fail=ServiceUnavailable("the expensive tier could not answer"))
    cascade = tiers.cascade()

    async def four() -> list:
        return [await cascade(rows(0), DEPLOYED) for _ in range(4)]

    answers = asyncio.run(four())
    assert all(a.predictions[0].degraded and a.predictions[0].tier == "cheap" for a in answers)
    assert [a.degraded_reason for a in answers] == ["unavailable"] * 2 + ["breaker_open"] * 2
    assert len(tiers.expensive_calls) == 2  # open after two failures: no more calls
    assert cascade.breakers["3"].state == "open"
    challenger = CascadeRoute("7", "digits-cheap/4", "digits-exp/5", threshold=0.7)
    answer = asyncio.run(cascade(rows(0), challenger))
    assert answer.degraded_reason == "unavailable"  # tried: its breaker is its own
    assert tiers.expensive_calls[-1] == (1, "digits-exp/5")
    # The next deployed version starts with a closed breaker of its own.
    promoted = CascadeRoute("4", None, None, threshold=0.7)
    assert asyncio.run(cascade(rows(0), promoted)).degraded_reason == "unavailable"


def test_a_bug_in_the_expensive_tier_degrades_with_reason_error() -> None:
    tiers = Tiers(fail=TierError("the expensive tier failed on this request (ValueError)"))
    answer = asyncio.run(tiers.cascade()(rows(0, 1), DEPLOYED))
    assert answer.degraded_reason == "error"
    assert [p.degraded for p in answer.predictions] == [True, False]


def test_a_shedding_expensive_tier_degrades_but_is_no_breaker_failure() -> None:
    tiers = Tiers(fail=Overloaded("the expensive tier is at capacity: retry shortly"))
    cascade = tiers.cascade(failures=1)
    for _ in range(3):
        assert asyncio.run(cascade(rows(0), DEPLOYED)).degraded_reason == "overloaded"
    assert cascade.breakers["3"].state == "closed" and len(tiers.expensive_calls) == 3


def test_one_slow_call_carrying_five_requests_is_one_breaker_failure() -> None:
    # The first request's call goes alone and answers in 0.05 s; the five that arrived
    # meanwhile go out together as the second call, which takes 5 s and times out for
    # each of them at 1 s: one call, one failure, so the breaker (2 to open) stays closed.
    # (The margins are wide on purpose: a timer race on a loaded host must not decide.)
    tiers = Tiers(delay_s=5, first_delay_s=0.05)
    cascade = tiers.cascade(timeout_s=1.0, failures=2)

    async def six_at_once() -> list:
        return await asyncio.gather(*(cascade(rows(0), DEPLOYED) for _ in range(6)))

    answers = asyncio.run(six_at_once())
    assert sorted(a.degraded_reason for a in answers) == [""] + ["timeout"] * 5
    assert [n for n, _ in tiers.expensive_calls] == [1, 5]
    assert cascade.breakers["3"].failures == 1 and cascade.breakers["3"].state == "closed"


def test_a_cancelled_trial_call_does_not_leave_the_breaker_stuck_open() -> None:
    clock = FakeClock()
    tiers = Tiers(delay_s=60)
    cascade = tiers.cascade(timeout_s=30, failures=1, clock=clock)
    breaker = cascade.breakers.setdefault("3", cascade.new_breaker())
    breaker.record_failure()  # open
    clock.now = 60  # half-open: the next call is the trial

    async def cancel_the_trial() -> None:
        task = asyncio.create_task(cascade(rows(0), DEPLOYED))
        while not tiers.expensive_calls:
            await asyncio.sleep(0.01)
        task.cancel()  # the client went away mid-trial
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancel_the_trial())
    assert breaker.state == "half-open" and breaker.allow()  # the next request may try
