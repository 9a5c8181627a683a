"""What the service reports about itself, free of Ray: per request (route, status,
latency) and per prediction (which tier and model version answered, degraded or not).

The ingress plugs in an :class:`Observer` backed by Ray Serve metrics (Prometheus); tests
plug in a recording one. Model versions are tags, so two versions serving side by side
(a swap in progress, later an A/B split) can be compared on requests, errors and latency.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from serve_graphs.cascade import Prediction


class Observer(Protocol):
    def request(self, route: str, status: int, seconds: float) -> None: ...

    def predictions(self, predictions: list[Prediction]) -> None: ...


class NullObserver:
    def request(self, route: str, status: int, seconds: float) -> None:
        pass

    def predictions(self, predictions: list[Prediction]) -> None:
        pass


def route_of(path: str) -> str:
    """A path's route template: a metric tag with a handful of values, whatever the
    clients send (a tag per raw path would grow without bound)."""
    if path.startswith("/v1/models/") and path.endswith("/predict"):
        return "/v1/predict"
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
    """Pure ASGI: hands every HTTP request's route, status and duration to an observer."""

    def __init__(self, app: Any, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.observer.request(route_of(scope["path"]), status, time.perf_counter() - started)


class CostMeter:
    """Live cost of serving, as one ingress replica sees it since it started: how many
    instances each tier answered, how long tier calls took per instance, and from that
    the estimated compute per request. Feeds ``GET /v1/models/{name}/cost``."""

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
        escalated = share(self.call_rows["expensive"])
        per_instance = per_row["cheap"] + escalated * per_row["expensive"]
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
