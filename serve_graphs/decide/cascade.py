"""The cascade, free of Ray: the cheap tier answers when it is sure enough, the
expensive tier answers the rest.

One path, in two halves. :class:`Cascade` runs in the cheap tier's replica (its
Serve method ``TierModel.cascade``): the decision, the expensive tier behind a timeout
and a circuit breaker, and degraded answers when that tier cannot answer.
:class:`CascadeCaller` is the ingress's half: one call per request to the cheap tier
(coalesced), and the meters fed from the answers.

Why the cheap tier: the ingress's event loop is the graph's bottleneck (one replica,
about one core). When the ingress ran the cascade, an escalated request went through
that loop twice, once per tier call; with the cascade in the cheap tier every request
is one call from the ingress (bench/results/2026-11-29-serve.md, fourth session).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import pandas as pd

from app.errors import Overloaded, ServiceUnavailable, TierError
from serve_graphs.decide.breaker import CircuitBreaker

KEPT = 16  # routed cascades whose breakers and expensive-tier callers a tier keeps
_V = TypeVar("_V")

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
CascadeFn = Callable[[Instances], Awaitable["CascadeAnswer"]]

# A failure that several requests share (their rows went to the tier as one call, see
# serve_graphs/coalesce.py) names that call here, so it counts once against a breaker.
SHARED_CALL = "coalesced_call"


def call_of(exc: BaseException) -> object | None:
    """The shared tier call a failure came from, or None (a request's own)."""
    return getattr(exc, SHARED_CALL, None)


@dataclass(frozen=True)
class CascadeAnswer:
    """A cascade's predictions for some rows, as the cheap tier returns them when it runs
    the cascade itself (:class:`Cascade`), with what the caller's meters need:
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
class Prediction:
    label: int
    confidence: float
    tier: str
    model_version: str
    degraded: bool = False


@dataclass(frozen=True)
class CascadeRoute:
    """Which cascade a call to the cheap tier runs, as the ingress sends it.

    ``key``: the cascade version (its breaker is its own, so a failing challenger never
    degrades the champion's answers, and an open breaker does not carry over to the next
    deployed version). ``cheap``/``expensive``: the tiers' model ids, None for their
    pinned versions. ``thresholds``: by the cheap tier's version label (during a swap the
    outgoing version keeps its own); ``threshold`` for any other."""

    key: str
    cheap: str | None
    expensive: str | None
    threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)


class Cascade:
    """The cascade, run where the cheap tier's answer is: the cheap tier answers, and
    the rows it is unsure of go on to the expensive tier.

    ``cheap(rows, model_id)`` answers on this replica; ``expensive(model_id)`` is the
    expensive tier's caller for a model id, which bounds its own wait
    (``serve.expensive_timeout_s``: a :class:`~serve_graphs.decide.coalesce.Coalescer`
    raises TimeoutError naming the call). When that tier is slow, failing, shedding or
    behind an open breaker, the unsure rows get the cheap tier's answer with
    ``degraded=True`` and the reason: a worse answer now beats none. Breakers are kept
    per cascade version and callers per model id, the last :data:`KEPT`.
    """

    def __init__(
        self,
        cheap: Callable[[Instances, str | None], Awaitable[TierAnswer]],
        expensive: Callable[[str | None], TierFn],
        *,
        breaker_failures: int,
        breaker_reset_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cheap = cheap
        self.expensive = expensive
        self.new_breaker = lambda: CircuitBreaker(breaker_failures, breaker_reset_s, clock)
        self.breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self.callers: OrderedDict[str | None, TierFn] = OrderedDict()

    async def __call__(self, instances: Instances, route: CascadeRoute) -> CascadeAnswer:
        started = time.perf_counter()
        cheap = await self.cheap(instances, route.cheap)
        cheap_seconds = cheap.cost(time.perf_counter() - started)
        confidence = cheap.probs.max(axis=1)
        labels = cheap.probs.argmax(axis=1)
        threshold = route.thresholds.get(cheap.version, route.threshold)
        answers = [
            Prediction(label, c, "cheap", cheap.version)
            for label, c in zip(labels.tolist(), confidence.tolist(), strict=True)
        ]
        escalate = np.flatnonzero(confidence < threshold)
        if not escalate.size:
            return CascadeAnswer(answers, cheap_seconds)
        started = time.perf_counter()
        expensive, reason = await self._expensive(route, take(instances, escalate))
        if expensive is None:
            for i in escalate:
                answers[i] = replace(answers[i], degraded=True)
            return CascadeAnswer(answers, cheap_seconds, 0.0, reason)
        probs = expensive.probs
        for i, label, c in zip(
            escalate, probs.argmax(axis=1).tolist(), probs.max(axis=1).tolist(), strict=True
        ):
            answers[i] = Prediction(label, c, "expensive", expensive.version)
        seconds = expensive.cost(time.perf_counter() - started)
        return CascadeAnswer(answers, cheap_seconds, seconds)

    async def _expensive(
        self, route: CascadeRoute, rows: Instances
    ) -> tuple[TierAnswer | None, str]:
        """The expensive tier's answer, or None and why it did not come."""
        breaker = _kept(self.breakers, route.key, self.new_breaker)
        if not breaker.allow():
            return None, "breaker_open"
        call = _kept(self.callers, route.expensive, lambda: self.expensive(route.expensive))
        try:
            answer = await call(rows)
        except Overloaded:  # load, not a fault of the tier: no verdict on it
            breaker.release_trial()
            return None, "overloaded"
        except TimeoutError as exc:
            breaker.record_failure(call_of(exc))
            return None, "timeout"
        except TierError as exc:  # its model code raised: logged where it was mapped
            breaker.record_failure(call_of(exc))
            return None, "error"
        except ServiceUnavailable as exc:
            breaker.record_failure(call_of(exc))
            return None, "unavailable"
        except BaseException:  # cancelled (the client is gone): no verdict on the tier
            breaker.release_trial()
            raise
        breaker.record_success()
        return answer, ""


def _kept(kept: OrderedDict, key: object, make: Callable[[], _V]) -> _V:
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


class CascadeCaller:
    """The ingress's side of the cascade that the cheap tier runs (:class:`Cascade`).

    ``call`` runs the deployed cascade (its route from :meth:`route`, read when a call
    goes out); a :class:`RoutedCascade` runs another. Answers feed ``on_tier_call``
    (the cost report) and ``on_degraded`` (the degraded counter), except for shadow
    copies (``record=False``): mirrored traffic is not served traffic.
    """

    def __init__(
        self,
        call: CascadeFn | None = None,
        *,
        on_degraded: Callable[[int, str], None] = lambda n, reason: None,
        on_tier_call: Callable[[str, int, float], None] = lambda tier, rows, seconds: None,
    ) -> None:
        self.call = call
        self.version = ""  # the deployed cascade version, once calibrated
        self.threshold = 1.0  # until calibrated: everything escalates
        self.thresholds: dict[str, float] = {}
        self.on_degraded = on_degraded
        self.on_tier_call = on_tier_call

    def calibrated(self, version: str, cheap_version: str, threshold: float) -> None:
        """A new deployed cascade ``version``: ``threshold`` for answers of
        ``cheap_version`` (and any version it does not know); the previous version
        keeps its own until it is gone (a swap)."""
        self.thresholds = calibrated(self.thresholds, cheap_version, threshold)
        self.version, self.threshold = version, threshold

    def route(self) -> CascadeRoute:
        return CascadeRoute(self.version, None, None, self.threshold, self.thresholds)

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


def calibrated(thresholds: dict[str, float], cheap_version: str, threshold: float) -> dict:
    """Thresholds by cheap-tier version after a new calibration: ``threshold`` for
    ``cheap_version``, and the previous version's own until it is gone (a swap)."""
    previous = {v: t for v, t in thresholds.items() if v != cheap_version}
    return {**dict(list(previous.items())[-1:]), cheap_version: threshold}
