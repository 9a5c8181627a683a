"""What the service reports about itself, free of Ray: per request (route, status,
latency) and per prediction (which tier and model version answered, degraded or not).

The ingress plugs in two :class:`Observer` s: one backed by Ray Serve metrics
(Prometheus), and :class:`LiveStats`, which counts per cascade version and time bucket and
reports to the cluster's serving-stats actor (the routes view and gated rollouts read it);
tests plug in a recording one. Model versions are tags, so two versions serving side by
side (a swap in progress, an A/B split, a canary) can be compared on requests, errors and
latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from actors.stats import Recorder
from app.logs import event
from serve_graphs.decide.cascade import Prediction

log = logging.getLogger("ray.serve")

VERSION_HEADER = "x-scaledl-version"  # the cascade version that answered a request
UNROUTED = "none"  # the version tag of a request no version answered (a 4xx, say)
PREDICT_ROUTES = ("/v1/predict", "/v2/infer")
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned before its answer


class Observer(Protocol):
    def request(self, route: str, status: int, seconds: float, version: str, shed: bool) -> None:
        """One HTTP answer. ``shed``: a 429/503 that shed load (over a rate limit, a
        bound on waiting); a 503 with ``shed`` false is a dependency that failed."""

    def predictions(self, version: str, predictions: list[Prediction]) -> None: ...

    def shadow(
        self,
        primary: str,
        shadow: str,
        answer: list[Prediction],
        mirrored: list[Prediction] | None,
        seconds: float,
    ) -> None:
        """A shadow copy's outcome: ``mirrored`` is None when the shadow failed."""

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        """A copy of ``n`` instances not mirrored: the shadows in flight were at their limit."""

    def degraded(self, n: int, reason: str) -> None:
        """``n`` instances answered degraded, and why."""


class NullObserver:
    def request(self, route: str, status: int, seconds: float, version: str, shed: bool) -> None:
        pass

    def predictions(self, version: str, predictions: list[Prediction]) -> None:
        pass

    def shadow(self, primary, shadow, answer, mirrored, seconds) -> None:  # noqa: ANN001
        pass

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        pass

    def degraded(self, n: int, reason: str) -> None:
        pass


class Fanout:
    """Several observers as one."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def request(self, route: str, status: int, seconds: float, version: str, shed: bool) -> None:
        for o in self.observers:
            o.request(route, status, seconds, version, shed)

    def predictions(self, version: str, predictions: list[Prediction]) -> None:
        for o in self.observers:
            o.predictions(version, predictions)

    def shadow(self, primary, shadow, answer, mirrored, seconds) -> None:  # noqa: ANN001
        for o in self.observers:
            o.shadow(primary, shadow, answer, mirrored, seconds)

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        for o in self.observers:
            o.shadow_dropped(primary, shadow, n)

    def degraded(self, n: int, reason: str) -> None:
        for o in self.observers:
            o.degraded(n, reason)


def route_of(path: str) -> str:
    """A path's route template: a metric tag with a handful of values, whatever the
    clients send (a tag per raw path would grow without bound)."""
    if path.startswith("/v1/models/"):
        if path.endswith("/predict"):
            return "/v1/predict"
        if path.endswith("/routes") or path.endswith("/cost"):
            return "/v1/admin"
    if path.startswith("/v2/health/"):
        return "/v2/health"
    if path.startswith("/v2/models/"):
        if path.endswith("/infer"):
            return "/v2/infer"
        return "/v2/ready" if path.endswith("/ready") else "/v2/metadata"
    if path in ("/v2", "/healthz", "/docs", "/openapi.json"):
        return path
    return "other"


class AccessLog:
    """One JSON line per HTTP answer, the ingress's access log (it replaces Serve's own,
    which cannot say which model version and tier answered).

    Serve's JSON logging (serve_graphs/builder.py) adds the request id (the client's
    ``x-request-id``, or one Serve made and returns in that header), the route, the
    application and the replica; the line adds the model, the version and the tiers that
    answered, the status and the latency. Written to the replica's file in the session's
    ``logs/serve/``, not to its stderr as well. Nothing of the body or the headers."""

    def __init__(self, model: str, logger: logging.Logger = log) -> None:
        self.model = model
        self.logger = logger

    def __call__(self, path: str, status: int, seconds: float, version: str, state: dict) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        event(
            self.logger,
            "request",
            model=self.model,
            endpoint=route_of(path),  # the metrics' route tag: never the raw path
            version=version,
            tier=state.get("tier", UNROUTED),
            degraded=state.get("degraded", 0),
            status=status,
            latency_ms=round(1000 * seconds, 3),
            log_to_stderr=False,  # Serve's key: its file only
        )


def answered_by(predictions: list[Prediction]) -> tuple[str, int]:
    """The tiers that answered a request's instances (``cheap``, ``expensive`` or
    ``cheap+expensive``) and how many instances were degraded: what its log line says."""
    tiers = sorted({p.tier for p in predictions})
    return "+".join(tiers) or UNROUTED, sum(p.degraded for p in predictions)


class RequestMetrics:
    """Pure ASGI: hands every HTTP request's route, status and duration to an observer,
    and to the access log when there is one.

    A request whose client left before its answer started (Serve cancels it) counts as
    :data:`CLIENT_CLOSED`, never as a server error: no client saw a 500."""

    def __init__(self, app: Any, observer: Observer, access_log: AccessLog | None = None) -> None:
        self.app = app
        self.observer = observer
        self.access_log = access_log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        version = UNROUTED
        answered = False

        async def send_and_note(message: dict) -> None:
            nonlocal status, version, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                for key, value in message.get("headers", ()):
                    if key == VERSION_HEADER.encode():
                        version = value.decode()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if status == 500 and not answered:
                status = CLIENT_CLOSED
            raise
        finally:
            state = scope.get("state", {})
            if version == UNROUTED:  # an error answered outside: the version the app chose
                version = state.get("version", UNROUTED)
            seconds = time.perf_counter() - started
            shed = status == 429 or state.get("shed", False)
            self.observer.request(route_of(scope["path"]), status, seconds, version, shed)
            if self.access_log is not None:
                self.access_log(scope["path"], status, seconds, version, state)


class CostMeter:
    """Live cost of serving, as one ingress replica sees it since it started: how many
    instances each tier answered, how long tier calls took per instance (a call that
    carried several requests' rows is shared among them by rows), and from that the
    estimated compute per request. Feeds ``GET /v1/models/{name}/cost``."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.since = clock()
        self.requests = 0
        self.answered: Counter = Counter()  # (tier, degraded) -> instances
        self.call_seconds: Counter = Counter()  # tier -> seconds spent in its calls
        self.call_rows: Counter = Counter()  # tier -> instances sent to it

    def tier_call(self, tier: str, rows: int, seconds: float) -> None:
        self.call_seconds[tier] += seconds
        self.call_rows[tier] += rows

    def predictions(self, predictions: list[Prediction]) -> None:
        self.requests += 1
        self.answered.update((p.tier, p.degraded) for p in predictions)

    def report(self) -> dict[str, float | int]:
        instances = sum(self.answered.values())
        share = lambda n: n / instances if instances else 0.0  # noqa: E731
        per_row = {
            tier: 1000 * self.call_seconds[tier] / self.call_rows[tier]
            if self.call_rows[tier]
            else 0.0
            for tier in ("cheap", "expensive")
        }
        # Escalated: the expensive tier answered, or should have (a degraded answer).
        escalated = share(self.answered[("expensive", False)] + self.answered[("cheap", True)])
        # Compute: only the rows the expensive tier did answer cost its time.
        answered_share = share(self.call_rows["expensive"])
        per_instance = per_row["cheap"] + answered_share * per_row["expensive"]
        return {
            "since_s": round(self.clock() - self.since, 1),
            "requests": self.requests,
            "instances": instances,
            "expensive_share": share(self.answered[("expensive", False)]),
            "escalated_share": escalated,
            "degraded_share": share(self.answered[("cheap", True)]),
            "cheap_ms_per_instance": per_row["cheap"],
            "expensive_ms_per_instance": per_row["expensive"],
            "compute_ms_per_instance": per_instance,
            "compute_ms_per_request": per_instance * instances / self.requests
            if self.requests
            else 0.0,
        }


class StatsSink(Protocol):
    """Where the live statistics go and are read back: the serving-stats actor
    (actors/serving_stats.py) in the ingress, an in-process StatsStore in tests."""

    async def add(self, summaries: list[dict[str, Any]]) -> None: ...

    async def report(self, model: str, start: float, end: float) -> dict[str, Any]: ...


class LiveStats:
    """The Observer that feeds the cluster-wide live statistics: a :class:`Recorder`
    counts each predict request of a cascade version (outcome, latency), its instances
    (escalated, degraded) and each shadow copy's agreement, under the shadow's version.
    :meth:`run` sends what it counted to the sink every ``every_s``, off the request
    path; a failed send is put back and goes with the next. Feeds ``GET /routes`` and,
    through the actor, the rollout controller.

    Everything here runs on the replica's event loop: the Recorder is not locked."""

    def __init__(
        self,
        model: str,
        sink: StatsSink,
        *,
        every_s: float = 5.0,
        bucket_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model, self.sink, self.every_s, self.clock = model, sink, every_s, clock
        self.recorder = Recorder(bucket_s, clock)
        self.failing = False  # the last send failed: said once, not every interval

    def request(
        self, route: str, status: int, seconds: float, version: str, shed: bool = True
    ) -> None:
        if route in PREDICT_ROUTES and version != UNROUTED:
            self.recorder.request(self.model, version, status, seconds, shed)

    def predictions(self, version: str, predictions: list[Prediction]) -> None:
        degraded = sum(p.degraded for p in predictions)
        # Escalated: the expensive tier answered, or should have (a degraded answer).
        escalated = sum(p.tier == "expensive" for p in predictions) + degraded
        self.recorder.predictions(
            self.model, version, len(predictions), escalated=escalated, degraded=degraded
        )

    def shadow(self, primary, shadow, answer, mirrored, seconds) -> None:  # noqa: ANN001
        if mirrored is None:
            self.recorder.shadow(self.model, shadow, 0, 0, failed=len(answer))
            return
        agree = sum(a.label == m.label for a, m in zip(answer, mirrored, strict=True))
        self.recorder.shadow(self.model, shadow, agree, len(answer) - agree)

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        self.recorder.count(self.model, shadow, "shadow_dropped", n)

    def degraded(self, n: int, reason: str) -> None:
        pass  # counted with the answer's predictions

    async def flush(self) -> None:
        """Send everything counted so far; on failure it is kept for the next send."""
        summaries = self.recorder.drain()
        if not summaries:
            return
        try:
            await self.sink.add([s.model_dump() for s in summaries])
        except BaseException:
            self.recorder.requeue(summaries)
            raise

    async def run(self) -> None:
        """Flush every ``every_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - kept and retried; said once
                if not self.failing:
                    log.warning("sending live statistics failed (%s); kept, retrying", exc)
                self.failing = True
            else:
                if self.failing:
                    log.info("sending live statistics works again")
                self.failing = False

    async def view(self, window_s: float) -> dict[str, Any]:
        """Per-version figures over the last ``window_s`` seconds, cluster-wide: this
        replica's counts are sent first, so they include the requests just answered."""
        await self.flush()
        now = self.clock()
        report = await self.sink.report(self.model, now - window_s, now)
        return {"window_s": window_s, "versions": report["versions"]}
