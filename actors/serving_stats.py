"""The serving-stats actor: one per cluster, named, detached, over :class:`StatsStore`.

Every ingress replica sends it what its :class:`~actors.stats.Recorder` counted every
``ops.report_every_s``; the routes admin view and the rollout controller read windows
from it. Detached, so it outlives the job or the `scaledl serve` that first created it
and keeps its hour of buckets across redeploys. ``max_restarts=-1``: should its process
die, Ray starts it again, empty; the replicas' next reports refill it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ray

from actors.named import named_actor
from actors.stats import StatsStore

NAME = "scaledl-serving-stats"


class ServingStats:
    """The actor's body: the store's methods, plain dicts across Ray. A sync actor runs
    one call at a time, so the store needs no lock."""

    def __init__(self, retention_s: float = 3600.0) -> None:
        self.store = StatsStore(retention_s)

    def add(self, summaries: list[dict[str, Any]]) -> None:
        self.store.add(summaries)

    def window(self, model: str, version: str, start: float, end: float) -> dict[str, Any]:
        return self.store.window(model, version, start, end).model_dump()

    def report(self, model: str, start: float, end: float) -> dict[str, Any]:
        return self.store.report(model, start, end)


def serving_stats(retention_s: float = 3600.0) -> ray.actor.ActorHandle:
    """The cluster's serving-stats actor, created on first use: every caller (each
    ingress replica, the rollout controller, the CLI) gets the same one by name.
    ``retention_s`` applies when this call creates it."""
    return named_actor(ServingStats, NAME, retention_s)


class StatsClient:
    """The actor as an async sink (``serve_graphs.api.observe.StatsSink``): what an
    ingress replica reports to and reads its routes view from. The handle is looked up
    on first use, and again after the actor was lost for good.

    The lookup runs on a thread, off the replica's event loop: it is a blocking call to
    the GCS, and while the GCS is down (a head restarting) it waits for it, which on the
    loop stalled every request of the replica (tests/system/test_cluster_faults.py)."""

    def __init__(
        self,
        retention_s: float = 3600.0,
        lookup: Callable[[float], ray.actor.ActorHandle] = serving_stats,
    ) -> None:
        self.retention_s = retention_s
        self._lookup = lookup  # a test passes its own, to time the loop around it
        self._actor: ray.actor.ActorHandle | None = None

    async def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = await asyncio.to_thread(self._lookup, self.retention_s)
        return self._actor

    async def add(self, summaries: list[dict[str, Any]]) -> None:
        try:
            await (await self._handle()).add.remote(summaries)
        except ray.exceptions.ActorDiedError:
            self._actor = None
            raise

    async def report(self, model: str, start: float, end: float) -> dict[str, Any]:
        try:
            return await (await self._handle()).report.remote(model, start, end)
        except ray.exceptions.ActorDiedError:
            self._actor = None
            raise
