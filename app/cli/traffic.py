"""Sending labelled instances to the predict endpoint and measuring what comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrafficReport:
    latencies_ms: list[float] = field(default_factory=list)
    correct: int = 0
    escalated: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # HTTP status or transport error
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    @property
    def accuracy(self) -> float:
        return self.correct / self.answered if self.answered else float("nan")

    @property
    def escalated_share(self) -> float:
        return self.escalated / self.answered if self.answered else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else float("nan")

    def fail(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def send_instances(
    url: str,
    api_key: str,
    instances: np.ndarray,
    labels: np.ndarray,
    *,
    concurrency: int,
    on_done: Callable[[], None] = lambda: None,
) -> TrafficReport:
    """One request per instance, ``concurrency`` in flight; latency measured per request."""
    import httpx

    report = TrafficReport()
    pending = list(range(len(instances)))
    headers = {"Authorization": f"Bearer {api_key}"}

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            i = pending.pop()
            started = time.perf_counter()
            try:
                resp = await http.post(
                    url, json={"instances": [instances[i].tolist()]}, headers=headers
                )
            except httpx.HTTPError as exc:  # refused, reset, timed out: a failed request
                report.fail(type(exc).__name__)
                on_done()
                continue
            if resp.status_code == 200:
                report.latencies_ms.append((time.perf_counter() - started) * 1000)
                prediction = resp.json()["predictions"][0]
                report.correct += int(prediction["label"] == labels[i])
                report.escalated += int(prediction["tier"] == "expensive")
            else:
                report.fail(str(resp.status_code))
            on_done()

    started = time.perf_counter()
    async with httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=concurrency)
    ) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    report.seconds = time.perf_counter() - started
    return report
