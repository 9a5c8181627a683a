"""What the service reports about itself, free of Ray: per request (route, status,
latency) and per prediction (which tier and model version answered, degraded or not).

The ingress plugs in an :class:`Observer` backed by Ray Serve metrics (Prometheus); tests
plug in a recording one. Model versions are tags, so two versions serving side by side
(a swap in progress, later an A/B split) can be compared on requests, errors and latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from serve_graphs.decide.cascade import Prediction

VERSION_HEADER = "x-scaledl-version"  # the cascade version that answered a request
UNROUTED = "none"  # the version tag of a request no version answered (a 4xx, say)
PREDICT_ROUTES = ("/v1/predict", "/v2/infer")
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned before its answer


class Observer(Protocol):
    def request(self, route: str, status: int, seconds: float, version: str) -> None: ...

    def predictions(self, predictions: list[Prediction]) -> None: ...

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
    def request(self, route: str, status: int, seconds: float, version: str) -> None:
        pass

    def predictions(self, predictions: list[Prediction]) -> None:
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

    def request(self, route: str, status: int, seconds: float, version: str) -> None:
        for o in self.observers:
            o.request(route, status, seconds, version)

    def predictions(self, predictions: list[Prediction]) -> None:
        for o in self.observers:
            o.predictions(predictions)

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


class RequestMetrics:
    """Pure ASGI: hands every HTTP request's route, status and duration to an observer.

    A request whose client left before its answer started (Serve cancels it) counts as
    :data:`CLIENT_CLOSED`, never as a server error: no client saw a 500."""

    def __init__(self, app: Any, observer: Observer) -> None:
        self.app = app
        self.observer = observer

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
            if version == UNROUTED:  # an error answered outside: the version the app chose
                version = scope.get("state", {}).get("version", UNROUTED)
            seconds = time.perf_counter() - started
            self.observer.request(route_of(scope["path"]), status, seconds, version)


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


class ABMeter:
    """A/B results as one ingress replica sees them since it started: per cascade
    version, predict requests, server errors and latency percentiles; per shadow pair,
    how often the shadow agreed with the answer returned. Feeds
    ``GET /v1/models/{name}/routes``; Prometheus gets the same from ServeMetrics."""

    def __init__(self, window: int = 4096) -> None:
        self.window = window  # latencies kept per version, for the percentiles
        self.requests: Counter = Counter()
        self.errors: Counter = Counter()
        self.latency_ms: dict[str, deque[float]] = {}
        self.mirrored: Counter = Counter()  # (primary, shadow) -> instances compared
        self.agreed: Counter = Counter()
        self.shadow_failed: Counter = Counter()
        self.shadow_dropped_n: Counter = Counter()  # (primary, shadow) -> copies dropped
        self.shadow_ms: Counter = Counter()

    def request(self, route: str, status: int, seconds: float, version: str) -> None:
        if route not in PREDICT_ROUTES or version == UNROUTED:
            return
        self.requests[version] += 1
        self.errors[version] += status >= 500
        self.latency_ms.setdefault(version, deque(maxlen=self.window)).append(seconds * 1000)

    def predictions(self, predictions: list[Prediction]) -> None:
        pass

    def shadow(self, primary, shadow, answer, mirrored, seconds) -> None:  # noqa: ANN001
        pair = (primary, shadow)
        self.shadow_ms[pair] += seconds * 1000
        if mirrored is None:
            self.shadow_failed[pair] += 1
            return
        self.mirrored[pair] += len(answer)
        self.agreed[pair] += sum(a.label == m.label for a, m in zip(answer, mirrored, strict=True))

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        self.shadow_dropped_n[(primary, shadow)] += 1

    def degraded(self, n: int, reason: str) -> None:
        pass

    def report(self) -> dict[str, Any]:
        def percentile(values: deque[float], q: float) -> float:
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        versions = {
            v: {
                "requests": n,
                "server_errors": self.errors[v],
                "p50_ms": percentile(self.latency_ms[v], 0.5),
                "p99_ms": percentile(self.latency_ms[v], 0.99),
            }
            for v, n in self.requests.items()
        }
        pairs = set(self.mirrored) | set(self.shadow_failed) | set(self.shadow_dropped_n)
        shadows = [
            {
                "primary": primary,
                "shadow": shadow,
                "instances_compared": self.mirrored[(primary, shadow)],
                "agreement": self.agreed[(primary, shadow)] / self.mirrored[(primary, shadow)]
                if self.mirrored[(primary, shadow)]
                else None,
                "failed_copies": self.shadow_failed[(primary, shadow)],
                "dropped_copies": self.shadow_dropped_n[(primary, shadow)],
            }
            for primary, shadow in sorted(pairs)
        ]
        return {"versions": versions, "shadow": shadows}
