"""Live serving statistics, exact and mergeable, free of Ray.

Every ingress replica holds a :class:`Recorder`: per (model, cascade version, time bucket)
it counts requests by outcome, predictions escalated or degraded, shadow agreement, and a
latency histogram. Every ``ops.report_every_s`` it drains (:meth:`Recorder.drain`) what it
counted since the last drain and sends it, off the request path, to one named actor holding a
:class:`StatsStore`, which adds the buckets of all replicas together and keeps an hour.
A replica that dies loses what it counted since its last report: at most one interval.

Everything is integer counts, so merging is adding: exact, associative and commutative,
whatever the order the replicas' reports arrive in. The latency histogram has fixed
log-spaced buckets (:func:`latency_bucket`), the same on every replica, so histograms add
too and a quantile read from a merged one is within ~1.3 % of the true one.

A :class:`Summary` is open to more kinds: drift detection will send feature and prediction
bins as further ``histograms`` (``feature:<name>``, say) through the same path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

BUCKET_S = 10.0  # default width of a time bucket

# Latency buckets: bucket i holds [MIN_MS * RATIO**i, MIN_MS * RATIO**(i+1)). A ratio of
# sqrt(1.05) puts a value within ~1.2 % of its bucket's geometric midpoint, and makes a
# 5 % shift exactly two buckets. Below MIN_MS lands in bucket 0, above MAX_MS in the last.
LATENCY_MIN_MS = 0.1
LATENCY_MAX_MS = 120_000.0
LATENCY_RATIO = 1.05**0.5
_LOG_RATIO = math.log(LATENCY_RATIO)
LATENCY_BUCKETS = math.ceil(math.log(LATENCY_MAX_MS / LATENCY_MIN_MS) / _LOG_RATIO)

# Request outcomes: every request counts in exactly one, and `requests` is their sum.
OK, CLIENT_ERROR, SHED, ERROR, TIMEOUT, CANCELLED = (
    "ok",
    "client_error",
    "shed",
    "error",
    "timeout",
    "cancelled",
)
OUTCOMES = (OK, CLIENT_ERROR, SHED, ERROR, TIMEOUT, CANCELLED)
# Outcomes whose latency is the version's own doing and goes into the histogram. Shed and
# client errors are answered before any model runs; a cancelled request lasted as long
# as its client chose to wait.
TIMED_OUTCOMES = frozenset({OK, ERROR, TIMEOUT})
LATENCY = "latency"  # the histogram of request latencies, by latency_bucket()


def outcome_of(status: int, shed: bool = True) -> str:
    """The outcome an HTTP status counts as: 429 and 503 are load shed (the client is
    asked to retry), 504 a timeout, 499 a client that left, any other 4xx the client's
    error, any other 5xx a server error. ``shed=False``: this 503 was not load shed but
    a dependency that could not answer (a tier down, a model that does not load), which
    is the version's failure and counts as an error."""
    if status < 400:
        return OK
    if status == 429 or (status == 503 and shed):
        return SHED
    if status == 504:
        return TIMEOUT
    if status == 499:
        return CANCELLED
    if status < 500:
        return CLIENT_ERROR
    return ERROR


def latency_bucket(ms: float) -> int:
    """The histogram bucket of a latency in milliseconds, clamped to the fixed range."""
    if ms <= LATENCY_MIN_MS:
        return 0
    return min(int(math.log(ms / LATENCY_MIN_MS) / _LOG_RATIO), LATENCY_BUCKETS - 1)


def bucket_ms(index: int) -> float:
    """The geometric midpoint of a latency bucket, in milliseconds."""
    return LATENCY_MIN_MS * LATENCY_RATIO ** (index + 0.5)


def quantile(histogram: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram, in ms: the midpoint of the bucket
    holding the value of rank ceil(q * n), as numpy's 'inverted_cdf'. None when empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return bucket_ms(index)
    raise AssertionError("unreachable: the ranks add up to the total")


class Summary(BaseModel):
    """Counts for one model and cascade version over [start, end): one time bucket as a
    replica sends it, or a window merged from many. Plain JSON, so it crosses a Ray
    boundary as ``model_dump()`` / ``model_validate()``; dict keys of histograms come back
    from JSON as strings and are read back as ints."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model (workload) name, e.g. digits.")
    version: str = Field(description="The cascade version the counts are about.")
    start: float = Field(description="Start of the time span, seconds since the epoch.")
    end: float = Field(description="End of the time span (exclusive).")
    counters: dict[str, int] = Field(
        default_factory=dict,
        description="Named counts: the outcomes (ok, client_error, shed, error, timeout, "
        "cancelled), instances, escalated, degraded, shadow_agree, shadow_disagree, "
        "shadow_failed, shadow_dropped; later kinds add names.",
    )
    histograms: dict[str, dict[int, int]] = Field(
        default_factory=dict,
        description="Named sparse histograms, bucket index -> count. 'latency' uses "
        "latency_bucket(); later kinds (feature and prediction bins) add names.",
    )

    def count(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def requests(self) -> int:
        """Every request, whatever its outcome."""
        return sum(self.counters.get(o, 0) for o in OUTCOMES)

    def histogram(self, name: str = LATENCY) -> dict[int, int]:
        return self.histograms.get(name, {})

    def quantile_ms(self, q: float) -> float | None:
        return quantile(self.histogram(LATENCY), q)

    def add(self, other: Summary) -> None:
        """Add ``other``'s counts into this one (same model and version), spanning both."""
        if (other.model, other.version) != (self.model, self.version):
            raise ValueError(
                f"cannot add counts of {other.model} v{other.version} "
                f"to {self.model} v{self.version}"
            )
        self.start, self.end = min(self.start, other.start), max(self.end, other.end)
        for name, n in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + n
        for name, bins in other.histograms.items():
            mine = self.histograms.setdefault(name, {})
            for index, n in bins.items():
                mine[index] = mine.get(index, 0) + n

    @classmethod
    def empty(cls, model: str, version: str, start: float, end: float) -> Summary:
        return cls(model=model, version=version, start=start, end=end)

    @classmethod
    def merged(cls, summaries: Iterable[Summary]) -> Summary:
        """The sum of summaries of one model and version (at least one)."""
        it = iter(summaries)
        total = next(it).model_copy(deep=True)
        for s in it:
            total.add(s)
        return total


class Recorder:
    """What one ingress replica counts between two reports.

    Cheap on the request path: one dict lookup and a few integer adds per call. Not
    locked: every call, :meth:`drain` included, must run on the replica's event loop
    thread (asyncio runs one callback at a time, so none interleaves another); a sender
    must not drain from ``asyncio.to_thread``.
    """

    def __init__(self, bucket_s: float = BUCKET_S, clock: Callable[[], float] = time.time):
        if bucket_s <= 0:
            raise ValueError(f"bucket_s must be positive, got {bucket_s}")
        self.bucket_s = bucket_s
        self.clock = clock
        self._open: dict[tuple[str, str, float], Summary] = {}

    def _summary(self, model: str, version: str) -> Summary:
        start = math.floor(self.clock() / self.bucket_s) * self.bucket_s
        key = (model, version, start)
        summary = self._open.get(key)
        if summary is None:
            summary = self._open[key] = Summary.empty(model, version, start, start + self.bucket_s)
        return summary

    def request(
        self, model: str, version: str, status: int, seconds: float, shed: bool = True
    ) -> None:
        """One answered request: its HTTP status and how long it took; ``shed``: see
        :func:`outcome_of`."""
        summary = self._summary(model, version)
        outcome = outcome_of(status, shed)
        counters = summary.counters
        counters[outcome] = counters.get(outcome, 0) + 1
        if outcome in TIMED_OUTCOMES:
            bins = summary.histograms.get(LATENCY)
            if bins is None:
                bins = summary.histograms[LATENCY] = {}
            index = latency_bucket(seconds * 1000)
            bins[index] = bins.get(index, 0) + 1

    def predictions(
        self, model: str, version: str, instances: int, *, escalated: int = 0, degraded: int = 0
    ) -> None:
        """One answer's instances: how many the expensive tier answered or should have
        (escalated), and how many were answered degraded (cheap tier only)."""
        self.count(model, version, "instances", instances)
        self.count(model, version, "escalated", escalated)
        self.count(model, version, "degraded", degraded)

    def shadow(
        self, model: str, shadow_version: str, agree: int, disagree: int, failed: int = 0
    ) -> None:
        """A shadow copy compared with the answer returned, counted under the *shadow's*
        version (what is judged is the shadow): instances whose labels agreed, disagreed,
        or that the shadow failed to answer."""
        self.count(model, shadow_version, "shadow_agree", agree)
        self.count(model, shadow_version, "shadow_disagree", disagree)
        self.count(model, shadow_version, "shadow_failed", failed)

    def count(self, model: str, version: str, name: str, n: int = 1) -> None:
        """Add ``n`` to a named counter (any kind: later components add their own)."""
        if n:
            counters = self._summary(model, version).counters
            counters[name] = counters.get(name, 0) + n

    def observe(self, model: str, version: str, histogram: str, index: int, n: int = 1) -> None:
        """Add ``n`` to bin ``index`` of a named histogram (drift's feature bins, say)."""
        bins = self._summary(model, version).histograms.setdefault(histogram, {})
        bins[index] = bins.get(index, 0) + n

    def drain(self) -> list[Summary]:
        """Everything counted since the last drain, the current partial bucket included,
        and start afresh: each count goes out in exactly one drain."""
        drained, self._open = list(self._open.values()), {}
        return drained

    def requeue(self, summaries: Iterable[Summary]) -> None:
        """Put back what a failed send drained, to go out with the next report."""
        for s in summaries:
            key = (s.model, s.version, s.start)
            if key in self._open:
                self._open[key].add(s)
            else:
                self._open[key] = s


class StatsStore:
    """What the named stats actor holds: every replica's buckets added together, for
    ``retention_s`` seconds, read back as windows."""

    def __init__(self, retention_s: float = 3600.0, clock: Callable[[], float] = time.time):
        self.retention_s = retention_s
        self.clock = clock
        self._buckets: dict[tuple[str, str], dict[float, Summary]] = {}

    def add(self, summaries: Iterable[Summary | dict[str, Any]]) -> None:
        """Add reported buckets (as Summaries or their ``model_dump()``); a bucket older
        than the retention is dropped."""
        oldest = self.clock() - self.retention_s
        for s in summaries:
            s = Summary.model_validate(s) if isinstance(s, dict) else s
            if s.start < oldest:
                continue
            buckets = self._buckets.setdefault((s.model, s.version), {})
            if s.start in buckets:
                buckets[s.start].add(s)
            else:
                buckets[s.start] = s.model_copy(deep=True)
        self.prune()

    def prune(self) -> None:
        """Drop buckets that started more than ``retention_s`` ago."""
        oldest = self.clock() - self.retention_s
        for key in list(self._buckets):
            buckets = self._buckets[key]
            for start in [t for t in buckets if t < oldest]:
                del buckets[start]
            if not buckets:
                del self._buckets[key]

    def window(self, model: str, version: str, start: float, end: float) -> Summary:
        """The buckets of one version with start <= bucket start < end, added together
        (empty counts when there are none). A bucket straddling ``start`` is left out:
        part of it predates the window."""
        total = Summary.empty(model, version, start, end)
        for t, s in self._buckets.get((model, version), {}).items():
            if start <= t < end:
                total.add(s)
        total.start, total.end = start, end
        return total

    def versions(self, model: str, start: float, end: float) -> list[str]:
        """The versions of ``model`` with at least one bucket in the window."""
        return sorted(
            version
            for (m, version), buckets in self._buckets.items()
            if m == model and any(start <= t < end for t in buckets)
        )

    def report(self, model: str, start: float, end: float) -> dict[str, Any]:
        """Per-version figures over a window, for a person (the routes admin view)."""
        return {
            "model": model,
            "start": start,
            "end": end,
            "versions": {
                v: figures(self.window(model, v, start, end))
                for v in self.versions(model, start, end)
            },
        }


def figures(s: Summary) -> dict[str, Any]:
    """A summary as a person reads it: requests by outcome, rates and percentiles."""
    requests, instances = s.requests, s.count("instances")
    compared = s.count("shadow_agree") + s.count("shadow_disagree")

    def share(n: int, of: int) -> float | None:
        return round(n / of, 6) if of else None

    def ms(q: float) -> float | None:
        value = s.quantile_ms(q)
        return None if value is None else round(value, 2)

    return {
        "requests": requests,
        "outcomes": {o: s.count(o) for o in OUTCOMES},
        "error_rate": share(s.count(ERROR) + s.count(TIMEOUT), requests),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "instances": instances,
        "escalated_share": share(s.count("escalated"), instances),
        "degraded_share": share(s.count("degraded"), instances),
        "shadow": {
            "compared": compared,
            "agreement": share(s.count("shadow_agree"), compared),
            "failed": s.count("shadow_failed"),
            "dropped": s.count("shadow_dropped"),
        },
    }
