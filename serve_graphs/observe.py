"""What the service reports about itself, free of Ray: per request (route, status,
latency) and per prediction (which tier and model version answered, degraded or not).

The ingress plugs in an :class:`Observer` backed by Ray Serve metrics (Prometheus); tests
plug in a recording one. Model versions are tags, so two versions serving side by side
(a swap in progress, later an A/B split) can be compared on requests, errors and latency.
"""

from __future__ import annotations

import time
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
