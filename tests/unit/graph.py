"""The serving graph without Ray, wired as the deployments wire it: the ingress's
CascadeCaller calls the cheap tier's :class:`Tier` (which runs the cascade) through the
same coalesced tier caller, and the cheap tier calls the expensive tier's the same way.

Three stand-ins, for what needs a running Serve replica or actor:
- :class:`Handle` for a DeploymentHandle: ``handle.options(...).method.remote(...)``
  calls the replica's method in-process, and an exception raised there reaches the
  caller as Serve delivers it, wrapped in a RayTaskError;
- :class:`Batcher` for ``@serve.batch`` (which needs a replica context): the chunks
  submitted in one event-loop pass run as one batch;
- :class:`LocalStats` for the serving-stats actor's client (actors/serving_stats.py
  ``StatsClient``): the same :class:`StatsStore`, in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from ray.exceptions import RayTaskError

from actors.stats import StatsStore
from app.sections import ServeConfig
from serve_graphs.decide.cascade import CascadeCaller, CascadeRoute, RoutedCascade
from serve_graphs.decide.coalesce import callers
from serve_graphs.decide.tier import Probs, Tier, TierModelRef, TierRunner, Work
from serve_graphs.decide.tier_calls import tier_caller


class LocalStats:
    """The serving-stats actor's async surface over a StatsStore in this process."""

    def __init__(self, store: StatsStore | None = None) -> None:
        self.store = store or StatsStore()

    async def add(self, summaries: list[dict]) -> None:
        self.store.add(summaries)

    async def report(self, model: str, start: float, end: float) -> dict:
        return self.store.report(model, start, end)


class Handle:
    """A DeploymentHandle's calling surface over an object in this process."""

    def __init__(self, target: object, model_id: str | None = None) -> None:
        self._target = target
        self.model_id = model_id
        self.calls: list[tuple[str, int]] = []  # (method, rows) of each call
        self.delay_s: dict[str | None, float] = {}  # by model id: a slow network or queue

    def options(self, multiplexed_model_id: str | None = None, **_: object) -> Handle:
        other = Handle(self._target, multiplexed_model_id)
        other.calls, other.delay_s = self.calls, self.delay_s
        return other

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, getattr(self._target, name), name)


@dataclass
class _Method:
    handle: Handle
    fn: Callable
    name: str

    def remote(self, *args: object):  # noqa: ANN201 - an awaitable, as Serve's response is
        rows = len(args[0]) if args and hasattr(args[0], "__len__") else 0
        self.handle.calls.append((self.name, rows))
        delay = self.handle.delay_s.get(self.handle.model_id, 0.0)
        return _as_serve_delivers(self.fn, args, self.name, delay)


async def _as_serve_delivers(fn, args, name: str, delay_s: float):  # noqa: ANN001, ANN202
    if delay_s:
        await asyncio.sleep(delay_s)
    try:
        return await fn(*args)
    except Exception as exc:  # what Serve's transport does to a replica's exception
        raise RayTaskError(name, "(in-process)", exc).as_instanceof_cause() from None


class Batcher:
    """``@serve.batch``'s part: the chunks submitted in one loop pass run in batches of
    at most the tier's ``max_rows`` rows, one batch at a time."""

    def __init__(self) -> None:
        self.tier: Tier | None = None
        self.pending: list[tuple[Work, asyncio.Future]] = []
        self.batches: list[int] = []  # rows per batch run

    async def __call__(self, work: Work) -> Probs:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((work, future))
        if len(self.pending) == 1:
            loop.call_soon(lambda: loop.create_task(self._run()))
        return await future

    async def _run(self) -> None:
        pending, self.pending = self.pending, []
        batches: list[list[tuple[Work, asyncio.Future]]] = [[]]
        for item in pending:
            if batches[-1] and sum(len(w) for w, _ in batches[-1]) + len(item[0]) > (
                self.tier.max_rows
            ):
                batches.append([])
            batches[-1].append(item)
        for batch in batches:
            await self._run_one(batch)
            await asyncio.sleep(0)  # as Serve's batcher, the loop runs between batches

    async def _run_one(self, batch: list[tuple[Work, asyncio.Future]]) -> None:
        self.batches.append(sum(len(w) for w, _ in batch))
        try:
            answers = await self.tier.run_batch([w for w, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every chunk's
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            future.set_result(answer)


def tier(
    runner: TierRunner,
    *,
    routed: dict[str, TierRunner] | None = None,
    max_rows: int = 64,
    expensive: Callable | None = None,
    cfg: ServeConfig | None = None,
) -> Tier:
    """A tier replica serving ``runner`` (pinned), with ``routed`` versions by model id."""
    cfg = cfg or ServeConfig()
    batcher = Batcher()
    routed = routed or {}

    async def load(model_id: str) -> TierRunner:
        return routed[model_id]

    replica = Tier(
        batcher,
        load,
        max_rows=max_rows,
        expensive=expensive,
        breaker_failures=cfg.breaker_failures,
        breaker_reset_s=cfg.breaker_reset_s,
    )
    batcher.tier = replica
    replica.swap(runner, TierModelRef.from_id(runner.version))
    return replica


@dataclass
class Graph:
    """The tiers, their handles and the ingress's cascade caller."""

    cheap: Tier
    expensive: Tier
    cheap_handle: Handle
    expensive_handle: Handle
    caller: CascadeCaller
    cfg: ServeConfig

    def route_to(self, version: str, cheap_id: str, expensive_id: str, threshold: float):  # noqa: ANN201
        """A routed cascade version, as the ingress binds one (Ingress._bind)."""
        route = CascadeRoute(version, cheap_id, expensive_id, threshold)
        return RoutedCascade(version, ingress_caller(self, lambda: route, cheap_id))


def ingress_caller(graph: Graph, route, model_id: str | None = None):  # noqa: ANN001, ANN201
    return tier_caller(
        graph.cheap_handle,
        "cheap",
        graph.cfg,
        model_id,
        replicas=lambda: 1,
        max_rows=lambda: graph.cfg.batch.max_batch_size,
        timeout_s=graph.cfg.request_timeout_s,
        tag=lambda: "",
        route=route,
    )


def graph(
    cheap: TierRunner,
    expensive: TierRunner,
    *,
    version: str = "3",
    threshold: float = 0.5,
    cheap_routed: dict[str, TierRunner] | None = None,
    expensive_routed: dict[str, TierRunner] | None = None,
    cfg: ServeConfig | None = None,
) -> Graph:
    """The graph serving cascade ``version`` (``cheap`` then ``expensive`` below
    ``threshold``), as Ingress and TierModel wire it."""
    cfg = cfg or ServeConfig()
    exp = tier(expensive, routed=expensive_routed, max_rows=cfg.batch.max_batch_size, cfg=cfg)
    exp_handle = Handle(exp)

    def expensive_caller(model_id: str | None):  # noqa: ANN202 - TierModel._expensive_caller
        return tier_caller(
            exp_handle,
            "expensive",
            cfg,
            model_id,
            replicas=lambda: 1,
            max_rows=lambda: cfg.batch.max_batch_size,
            timeout_s=cfg.expensive_timeout_s,
            tag=lambda: " ".join(callers()),
        )

    chp = tier(
        cheap,
        routed=cheap_routed,
        max_rows=cfg.batch.max_batch_size,
        expensive=expensive_caller,
        cfg=cfg,
    )
    cheap_handle = Handle(chp)
    caller = CascadeCaller()
    g = Graph(chp, exp, cheap_handle, exp_handle, caller, cfg)
    caller.call = ingress_caller(g, caller.route)
    caller.calibrated(version, cheap.version, threshold)
    return g
