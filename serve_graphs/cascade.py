"""The cascade decision, free of Ray: the cheap tier answers when it is sure enough,
the expensive tier answers the rest.

The expensive tier sits behind a timeout and a circuit breaker. When it is slow,
failing, or its breaker is open, the unsure instances get the cheap tier's answer with
``degraded=True`` instead of an error: a worse answer now beats none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from app.errors import ServiceUnavailable

# A request's rows: a float matrix (n, F) for workloads of plain numbers (digits), a frame
# of the feature columns for workloads of records (transactions).
Instances = np.ndarray | pd.DataFrame


def take(instances: Instances, index: np.ndarray | slice) -> Instances:
    """Rows of ``instances`` by position, whatever their form."""
    if isinstance(instances, pd.DataFrame):
        return instances.iloc[index]
    return instances[index]


def concat(parts: list[Instances]) -> Instances:
    if isinstance(parts[0], pd.DataFrame):
        return pd.concat(parts, ignore_index=True)
    return np.concatenate(parts)


@dataclass(frozen=True)
class TierAnswer:
    """Class probabilities (n, C) from one tier, and the model version that made them.

    ``seconds``: the tier time these rows account for, when the call carried other
    requests' rows too (a coalesced call's time, shared by rows); None: the whole wait.
    """

    probs: np.ndarray
    version: str
    seconds: float | None = None

    def cost(self, waited: float) -> float:
        return waited if self.seconds is None else self.seconds

    def __len__(self) -> int:
        return len(self.probs)

    def split(self, rows: list[int], seconds: float) -> list[TierAnswer]:
        """One answer per caller of a call that carried their ``rows`` (serve_graphs/
        coalesce.py), each charged its rows' share of the call's ``seconds``."""
        per_row = seconds / len(self.probs)
        parts = np.split(self.probs, np.cumsum(rows)[:-1])
        return [TierAnswer(p, self.version, per_row * len(p)) for p in parts]


TierFn = Callable[[Instances], Awaitable[TierAnswer]]

# A failure that several requests share (their rows went to the tier as one call, see
# serve_graphs/coalesce.py) names that call here, so it counts once against a breaker.
SHARED_CALL = "coalesced_call"


def call_of(exc: BaseException) -> object | None:
    """The shared tier call a failure came from, or None (a request's own)."""
    return getattr(exc, SHARED_CALL, None)


@dataclass(frozen=True)
class CascadeAnswer:
    """A cascade's predictions for some rows, as the cheap tier returns them when it runs
    the cascade itself (serve_graphs/escalate.py), with what the caller's meters need:
    the time each tier spent on these rows, and why unsure rows were answered degraded.

    ``expensive_seconds`` is spent on the rows the expensive tier answered."""

    predictions: list[Prediction]
    cheap_seconds: float
    expensive_seconds: float = 0.0
    degraded_reason: str = ""

    def __len__(self) -> int:
        return len(self.predictions)

    def escalated(self) -> int:
        return sum(p.tier == "expensive" for p in self.predictions)

    def split(self, rows: list[int], seconds: float) -> list[CascadeAnswer]:
        """One answer per caller of a call that carried their ``rows``, each charged as
        a :class:`TierAnswer` is: the cheap tier the call's round trip ``seconds`` (less
        the expensive tier's part) by rows, the expensive tier its time by the rows it
        answered."""
        total, escalated = len(self.predictions), self.escalated()
        cheap = max(0.0, seconds - self.expensive_seconds)
        parts, start = [], 0
        for n in rows:
            part = CascadeAnswer(self.predictions[start : start + n], 0.0)
            share = part.escalated() / escalated if escalated else 0.0
            parts.append(
                CascadeAnswer(
                    part.predictions,
                    cheap * n / total,
                    self.expensive_seconds * share,
                    self.degraded_reason,
                )
            )
            start += n
        return parts


@dataclass(frozen=True)
class Variant:
    """Another cascade version, ready to run beside the deployed one (A/B routing): its
    tiers, bound to its model versions, and the threshold calibrated for it."""

    version: str
    cheap: TierFn
    expensive: TierFn
    threshold: float


@dataclass(frozen=True)
class Prediction:
    label: int
    confidence: float
    tier: str
    model_version: str
    degraded: bool = False


class CircuitBreaker:
    """Closed; open after ``failures_to_open`` failures in a row; after ``reset_after_s``
    one trial call is let through (half-open): its success closes the breaker, its
    failure opens it again.

    Hand-written rather than pybreaker: that library is synchronous (its async support
    needs Tornado), and this is the whole of what the cascade needs.
    """

    def __init__(
        self,
        failures_to_open: int,
        reset_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.reset_after_s = reset_after_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False
        self.last_call: object | None = None  # the shared call that failed last

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.reset_after_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def release_trial(self) -> None:
        """The trial ended without a verdict (cancelled): let the next request try."""
        self.trial_in_flight = False

    def record_success(self) -> None:
        self.failures, self.opened_at, self.trial_in_flight = 0, None, False

    def record_failure(self, call: object | None = None) -> None:
        """One failure; the requests of one shared ``call`` (:func:`call_of`) fail
        together and count as one."""
        if call is not None and call is self.last_call:
            self.trial_in_flight = False
            return
        self.last_call = call
        self.failures += 1
        self.trial_in_flight = False
        if self.opened_at is not None or self.failures >= self.failures_to_open:
            self.opened_at = self.clock()


class Cascade:
    def __init__(
        self,
        cheap: TierFn,
        expensive: TierFn,
        threshold: float,
        *,
        expensive_timeout_s: float = 2.0,
        breaker: CircuitBreaker | None = None,
        on_degraded: Callable[[int, str], None] = lambda n, reason: None,
        on_tier_call: Callable[[str, int, float], None] = lambda tier, rows, seconds: None,
    ) -> None:
        self.cheap = cheap
        self.expensive = expensive
        self.threshold = threshold
        # Thresholds by the cheap tier's version label: during a swap, answers from the
        # outgoing version are judged by the threshold calibrated for it.
        self.thresholds: dict[str, float] = {}
        self.expensive_timeout_s = expensive_timeout_s
        self.breaker = breaker or CircuitBreaker(failures_to_open=5, reset_after_s=10.0)
        self.variant_breakers: dict[str, CircuitBreaker] = {}  # by cascade version
        self.on_degraded = on_degraded
        self.on_tier_call = on_tier_call  # (tier, instances, seconds) of each answered call

    async def predict(
        self, instances: Instances, variant: Variant | None = None, *, record: bool = True
    ) -> list[Prediction]:
        """One prediction per instance; only the unsure ones reach the expensive tier.

        ``variant`` is another cascade version to run instead of the deployed one (A/B
        routing); it has a breaker of its own, so a failing challenger never degrades
        the champion's answers. ``record=False`` (a shadow copy) leaves the cost and
        degradation callbacks out: mirrored traffic is not served traffic.
        """
        tiers = variant or self
        on_tier_call = self.on_tier_call if record else _ignore
        started = time.perf_counter()
        cheap = await tiers.cheap(instances)
        on_tier_call("cheap", len(instances), cheap.cost(time.perf_counter() - started))
        confidence = cheap.probs.max(axis=1)
        threshold = (
            variant.threshold if variant else self.thresholds.get(cheap.version, self.threshold)
        )
        escalate = np.flatnonzero(confidence < threshold)
        answers = [
            Prediction(int(p.argmax()), float(p.max()), "cheap", cheap.version) for p in cheap.probs
        ]
        if not escalate.size:
            return answers
        expensive, reason = await self._expensive(
            tiers.expensive, self._breaker(variant), take(instances, escalate), on_tier_call
        )
        if expensive is None:
            if record:
                self.on_degraded(len(escalate), reason)
            for i in escalate:
                answers[i] = Prediction(**{**answers[i].__dict__, "degraded": True})
            return answers
        for i, p in zip(escalate, expensive.probs, strict=True):
            answers[i] = Prediction(int(p.argmax()), float(p.max()), "expensive", expensive.version)
        return answers

    def calibrated(self, cheap_version: str, threshold: float) -> None:
        """A new cascade: ``threshold`` for answers of ``cheap_version`` (and any version
        it does not know); the previous version keeps its own until it is gone."""
        self.thresholds = calibrated(self.thresholds, cheap_version, threshold)
        self.threshold = threshold

    def _breaker(self, variant: Variant | None) -> CircuitBreaker:
        if variant is None:
            return self.breaker
        if variant.version not in self.variant_breakers:
            self.variant_breakers[variant.version] = CircuitBreaker(
                self.breaker.failures_to_open, self.breaker.reset_after_s, self.breaker.clock
            )
        return self.variant_breakers[variant.version]

    async def _expensive(
        self,
        expensive: TierFn,
        breaker: CircuitBreaker,
        instances: Instances,
        on_tier_call: Callable[[str, int, float], None],
    ) -> tuple[TierAnswer | None, str]:
        """The expensive tier's answer, or None and why it is unavailable."""
        if not breaker.allow():
            return None, "breaker_open"
        started = time.perf_counter()
        try:
            # Not wait_for: its task for the call costs two passes of the event loop.
            # Under load each pass waits behind every other request's work, so they
            # made the tier's answer take longer (bench/results/2026-11-29-serve.md).
            async with asyncio.timeout(self.expensive_timeout_s):
                answer = await expensive(instances)
        except TimeoutError as exc:
            breaker.record_failure(call_of(exc))
            return None, "timeout"
        except ServiceUnavailable as exc:
            breaker.record_failure(call_of(exc))
            return None, "unavailable"
        except BaseException:  # cancelled (client gone), or a bug: no verdict on the tier
            breaker.release_trial()
            raise
        breaker.record_success()
        on_tier_call("expensive", len(instances), answer.cost(time.perf_counter() - started))
        return answer, ""


def calibrated(thresholds: dict[str, float], cheap_version: str, threshold: float) -> dict:
    """Thresholds by cheap-tier version after a new calibration: ``threshold`` for
    ``cheap_version``, and the previous version's own until it is gone (a swap)."""
    previous = {v: t for v, t in thresholds.items() if v != cheap_version}
    return {**dict(list(previous.items())[-1:]), cheap_version: threshold}


def _ignore(tier: str, rows: int, seconds: float) -> None:
    pass
