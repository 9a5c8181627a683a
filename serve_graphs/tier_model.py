"""TierModel: one model tier as a batched, independently scaled Serve deployment.

A thin wrapper: which version answers which rows is :class:`~serve_graphs.decide.tier.
Tier`'s; the cascade the cheap tier runs is :class:`~serve_graphs.decide.cascade.
Cascade`'s. This file wires them to Serve: ``user_config`` (the pinned version and the
batching), ``@serve.batch`` (the batcher), model multiplexing (routed versions), and the
handle to the expensive tier.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from mlflow.exceptions import MlflowException
from ray import serve
from ray.serve.handle import DeploymentHandle
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.model_artifact import load_model
from app.registry import Registry
from app.sections import BatchConfig, ServeConfig
from serve_graphs.args import TierConfig
from serve_graphs.decide.cascade import (
    CascadeAnswer,
    CascadeRoute,
    Instances,
    TierFn,
)
from serve_graphs.decide.coalesce import callers
from serve_graphs.decide.routing import MAX_VERSIONS
from serve_graphs.decide.tier import Probs, Tier, TierModelRef, TierRunner, Work, batch_rows
from serve_graphs.decide.tier_calls import tier_caller, watch_replicas
from serve_graphs.scaling import BUSY, BusyMeter

log = logging.getLogger("ray.serve")
BATCH = BatchConfig()  # until reconfigure applies the deployment's user_config


@retry(  # a registry or artifact store that hiccups; ModelNotFound is not retried
    retry=retry_if_exception_type((OSError, MlflowException)),
    stop=stop_after_attempt(4),
    wait=wait_exponential(multiplier=0.5, max=4),
    reraise=True,
)
def load_runner(tracking_uri: str, model: TierModelRef) -> TierRunner:
    """A tier model version from the registry, loaded and ready to run."""
    registry = Registry(tracking_uri)
    ref = registry.resolve(model.registered_name, model.model_ref)
    return TierRunner(load_model(registry.download(ref)), ref.label)


@serve.deployment
class TierModel:
    """The model version comes with ``user_config`` (:class:`TierConfig`), not with the
    constructor: Serve applies a changed one with ``reconfigure`` on the running replica,
    which loads the new version beside the old one and then swaps them, so requests keep
    being answered throughout (a hot swap)."""

    def __init__(
        self,
        tracking_uri: str,
        expensive: DeploymentHandle | None = None,
        serve_config: dict | None = None,
    ) -> None:
        """``expensive``: the tier this one escalates to (the cheap tier has it, the
        expensive one not), with the settings of the escalation in ``serve_config``
        (part of the ``serve`` section: timeout, breaker, calls in flight, waiting)."""
        import torch

        # Requests are small: one intra-op thread per replica beats threads fighting
        # over the replica's CPU share. Scale out with replicas instead.
        torch.set_num_threads(1)
        self.tracking_uri = tracking_uri
        self.busy = BusyMeter()
        self.expensive = expensive
        self.expensive_replicas = {"expensive": 1}  # running, from serve.status()
        cfg = ServeConfig.model_validate(serve_config or {})
        self.tier = Tier(
            self.predict_batch,
            self.routed_runner,
            max_rows=BATCH.max_batch_size,
            busy=self.busy.running,
            expensive=None if expensive is None else self._expensive_caller(cfg),
            breaker_failures=cfg.breaker_failures,
            breaker_reset_s=cfg.breaker_reset_s,
        )
        self.watch: asyncio.Task | None = None

    def _expensive_caller(self, cfg: ServeConfig) -> Callable[[str | None], TierFn]:
        """Calls to the expensive tier for a model id, concurrent ones sent as one (at
        most ``serve.tier_calls_in_flight`` per running expensive replica), each caller
        waiting at most ``serve.expensive_timeout_s``."""
        return functools.partial(
            tier_caller,
            self.expensive,
            "expensive",
            cfg,
            replicas=lambda: self.expensive_replicas["expensive"],
            max_rows=lambda: self.tier.max_rows,  # the batch size reconfigure applied
            timeout_s=cfg.expensive_timeout_s,
            tag=lambda: " ".join(callers()),
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: how busy this replica was since the last
        reading (serve_graphs/scaling.py's policy scales the tier on it)."""
        return {BUSY: self.busy.read()}

    async def reconfigure(self, user_config: dict) -> None:
        """Load the configured version (if new) beside the one serving, then swap.

        A replica that serves nothing yet fails when its model cannot load (Serve reports
        it). One that serves keeps its version when the new one cannot load: a failed
        swap must not take a working tier down. The error is logged, and the deployment
        keeps answering with the old version until a config that loads is deployed.
        """
        cfg = TierConfig.model_validate(user_config)
        if cfg.model != self.tier.loaded:
            try:
                runner = await asyncio.to_thread(load_runner, self.tracking_uri, cfg.model)
            except Exception:
                if self.tier.runner is None:
                    raise
                log.exception(
                    "swap to %s failed; still serving %s",
                    cfg.model.model_id,
                    self.tier.runner.version,
                )
                return
            previous = self.tier.swap(runner, cfg.model)
            log.info("tier serves %s (was %s)", runner.version, previous)
        self.tier.max_rows = cfg.batch.max_batch_size
        self.predict_batch.set_max_batch_size(cfg.batch.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch.batch_wait_timeout_s)
        if self.expensive is not None and self.watch is None:
            self.watch = asyncio.get_running_loop().create_task(
                watch_replicas({"expensive": self.expensive}, self.expensive_replicas)
            )

    @serve.multiplexed(max_num_models_per_replica=MAX_VERSIONS)
    async def routed_runner(self, model_id: str) -> TierRunner:
        """Another version than the pinned one (a routed A/B version), loaded on first
        use and kept for the next calls; the least recently used goes first."""
        model = TierModelRef.from_id(model_id)
        runner = await asyncio.to_thread(load_runner, self.tracking_uri, model)
        log.info("loaded routed version %s", runner.version)
        return runner

    async def load(self, model_id: str) -> str:
        """Load a routed version before its first request (a routing table names it);
        the version label it loaded."""
        if self.tier.pins(model_id):
            return self.tier.runner.version
        return (await self.routed_runner(model_id)).version

    @serve.batch(
        max_batch_size=BATCH.max_batch_size,
        batch_wait_timeout_s=BATCH.batch_wait_timeout_s,
        batch_size_fn=batch_rows,
    )
    async def predict_batch(self, batch: list[Work]) -> list[Probs]:
        return await self.tier.run_batch(batch)

    async def predict(
        self, instances: Instances, model_id: str | None = None, requests: tuple[str, ...] = ()
    ) -> Probs:
        """Probabilities (n, C) for raw rows and the version that made them (Tier.predict)."""
        return await self.tier.predict(instances, model_id, requests)

    async def cascade(
        self, instances: Instances, route: CascadeRoute, requests: tuple[str, ...] = ()
    ) -> CascadeAnswer:
        """The cascade's predictions for raw rows, in the cheap tier (Tier.cascade)."""
        return await self.tier.cascade(instances, route, requests)
