"""TierModel: one model tier as a batched, independently scaled Serve deployment.

The cheap tier is bound to the expensive one and runs the cascade (serve_graphs/
escalate.py): the ingress calls it once per request, and it escalates the rows it is
unsure of itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from mlflow.exceptions import MlflowException
from ray import serve
from ray.serve.handle import DeploymentHandle
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.model_artifact import LoadedModel, load_model
from app.registry import Registry
from app.sections import BatchConfig, ServeConfig
from serve_graphs.args import TierConfig, TierModelRef
from serve_graphs.cascade import CascadeAnswer, Instances, TierAnswer, TierFn, concat, take
from serve_graphs.coalesce import Coalescer, callers, carrying
from serve_graphs.escalate import CascadeRoute, Escalation
from serve_graphs.routing import MAX_VERSIONS
from serve_graphs.scaling import BUSY, BusyMeter
from serve_graphs.tier_calls import tier_fn, watch_replicas

log = logging.getLogger("ray.serve")
BATCH = BatchConfig()  # until reconfigure applies the deployment's user_config
MAX_STRADDLES = 3  # tries for a multi-chunk request to land on one side of a swap


class TierRunner:
    """The Ray-free part: a loaded model version that turns raw rows into probabilities."""

    def __init__(self, model: LoadedModel, version: str) -> None:
        self.model = model
        self.version = version

    @classmethod
    @retry(  # a registry or artifact store that hiccups; ModelNotFound is not retried
        retry=retry_if_exception_type((OSError, MlflowException)),
        stop=stop_after_attempt(4),
        wait=wait_exponential(multiplier=0.5, max=4),
        reraise=True,
    )
    def from_registry(cls, tracking_uri: str, model: TierModelRef) -> TierRunner:
        registry = Registry(tracking_uri)
        ref = registry.resolve(model.registered_name, model.model_ref)
        return cls(load_model(registry.download(ref)), ref.label)

    def predict_many(self, batches: list[Instances]) -> list[np.ndarray]:
        """Run several requests' rows as one forward pass and split the answer back."""
        probs = self.model.predict_proba(concat(batches))
        return np.split(probs, np.cumsum([len(b) for b in batches])[:-1])


@dataclass(frozen=True)
class Work:
    """Rows of one request for the batcher, and the version to run them with (None: the
    pinned version, taken when the batch runs, so a swap lands between batches)."""

    rows: Instances
    runner: TierRunner | None = None

    def __len__(self) -> int:
        return len(self.rows)


def _rows(batch: list[Work]) -> int:
    """Batch size in rows, not requests: one 64-row request fills a 64-row batch."""
    return sum(len(w) for w in batch)


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
        (part of the ``serve`` section: timeout, breaker, calls in flight)."""
        import torch

        # Requests are small: one intra-op thread per replica beats threads fighting
        # over the replica's CPU share. Scale out with replicas instead.
        torch.set_num_threads(1)
        self.tracking_uri = tracking_uri
        self.runner: TierRunner | None = None
        self.loaded: TierModelRef | None = None
        self.max_rows = BATCH.max_batch_size
        self.busy = BusyMeter()
        self.escalation: Escalation | None = None
        self.watch: asyncio.Task | None = None
        if expensive is not None:
            cfg = ServeConfig.model_validate(serve_config or {})
            self.expensive, self.cfg = expensive, cfg
            self.expensive_replicas = {"expensive": 1}  # running, from serve.status()
            self.escalation = Escalation(
                self._answer,
                self._expensive_caller,
                expensive_timeout_s=cfg.expensive_timeout_s,
                breaker_failures=cfg.breaker_failures,
                breaker_reset_s=cfg.breaker_reset_s,
            )

    def _expensive_caller(self, model_id: str | None) -> TierFn:
        """Calls to the expensive tier for ``model_id``, concurrent ones sent as one: at
        most ``serve.tier_calls_in_flight`` per running expensive replica. A call is given
        up with its callers (``serve.expensive_timeout_s``)."""
        cfg = self.cfg
        return Coalescer(
            tier_fn(self.expensive, "expensive", model_id=model_id),
            max_in_flight=lambda: (
                cfg.tier_calls_in_flight * max(1, self.expensive_replicas["expensive"])
            ),
            max_rows=lambda: self.max_rows,  # the batch size reconfigure applied
            call_timeout_s=cfg.expensive_timeout_s,
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
        if cfg.model != self.loaded:
            try:
                runner = await asyncio.to_thread(
                    TierRunner.from_registry, self.tracking_uri, cfg.model
                )
            except Exception:
                if self.runner is None:
                    raise
                log.exception(
                    "swap to %s/%s failed; still serving %s",
                    cfg.model.registered_name,
                    cfg.model.model_ref,
                    self.runner.version,
                )
                return
            previous = self.runner.version if self.runner else None
            self.runner, self.loaded = runner, cfg.model  # the swap: one assignment
            log.info("tier serves %s (was %s)", runner.version, previous)
        self.max_rows = cfg.batch.max_batch_size
        self.predict_batch.set_max_batch_size(cfg.batch.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch.batch_wait_timeout_s)
        if self.escalation is not None and self.watch is None:
            self.watch = asyncio.get_running_loop().create_task(
                watch_replicas({"expensive": self.expensive}, self.expensive_replicas)
            )

    @serve.multiplexed(max_num_models_per_replica=MAX_VERSIONS)
    async def routed_runner(self, model_id: str) -> TierRunner:
        """Another version than the pinned one (a routed A/B version), loaded on first
        use and kept for the next calls; the least recently used goes first."""
        model = TierModelRef.from_id(model_id)
        runner = await asyncio.to_thread(TierRunner.from_registry, self.tracking_uri, model)
        log.info("loaded routed version %s", runner.version)
        return runner

    async def load(self, model_id: str) -> None:
        """Load a routed version before its first request (a routing table names it)."""
        if self.loaded is None or model_id != self.loaded.model_id:
            await self.routed_runner(model_id)

    @serve.batch(
        max_batch_size=BATCH.max_batch_size,
        batch_wait_timeout_s=BATCH.batch_wait_timeout_s,
        batch_size_fn=_rows,
    )
    async def predict_batch(self, batch: list[Work]) -> list[tuple[np.ndarray, str]]:
        """One forward pass per version in the batch (most batches hold one)."""
        pinned = self.runner  # one version for the whole batch, even if a swap lands now
        by_runner: dict[int, list[int]] = {}
        for i, work in enumerate(batch):
            by_runner.setdefault(id(work.runner or pinned), []).append(i)
        answers: list[tuple[np.ndarray, str]] = [None] * len(batch)  # type: ignore[list-item]
        with self.busy.running():
            for positions in by_runner.values():
                runner = batch[positions[0]].runner or pinned
                parts = runner.predict_many([batch[i].rows for i in positions])
                for i, probs in zip(positions, parts, strict=True):
                    answers[i] = (probs, runner.version)
        return answers

    async def predict(
        self, instances: Instances, model_id: str | None = None, requests: tuple[str, ...] = ()
    ) -> tuple[np.ndarray, str]:
        """Probabilities (n, C) for raw rows, and the version that produced them:
        ``model_id`` (``name/version``), or the pinned version when it is None.

        ``requests``: the ids of the HTTP requests whose rows the call carries (its
        caller sends several requests' rows as one call); logged, so a request id
        leads to the tier's log line of the call that answered it.

        A request larger than a batch is split into batch-sized chunks, which join other
        requests' rows in the batcher."""
        if requests:
            log.info("rows of requests %s", " ".join(requests))
        return await self._probs(instances, model_id)

    async def cascade(
        self, instances: Instances, route: CascadeRoute, requests: tuple[str, ...] = ()
    ) -> CascadeAnswer:
        """The cascade's predictions for raw rows: this tier answers, and sends the rows
        it is unsure of on to the expensive tier (serve_graphs/escalate.py). ``route``
        names the cascade (its models and thresholds); ``requests`` as for predict."""
        if self.escalation is None:
            raise RuntimeError("only the cheap tier runs the cascade: call predict here")
        if requests:
            log.info("rows of requests %s", " ".join(requests))
            carrying(requests)  # named to the expensive tier in turn
        return await self.escalation(instances, route)

    async def _answer(self, instances: Instances, model_id: str | None) -> TierAnswer:
        return TierAnswer(*await self._probs(instances, model_id))

    async def _probs(self, instances: Instances, model_id: str | None) -> tuple[np.ndarray, str]:
        routed = None  # None: the pinned version when the batch runs (swaps land between)
        if model_id is not None:  # this version and no other, even if a swap lands now
            pinned = self.loaded is not None and model_id == self.loaded.model_id
            routed = self.runner if pinned else await self.routed_runner(model_id)
        step = self.max_rows
        chunks = [
            Work(take(instances, slice(i, i + step)), routed)
            for i in range(0, len(instances), step)
        ]
        for _ in range(MAX_STRADDLES):
            answers = await asyncio.gather(*(self.predict_batch(c) for c in chunks))
            # Chunks that straddled a swap run again, so one version answers them all.
            if len({version for _, version in answers}) == 1:
                break
        return np.concatenate([probs for probs, _ in answers]), answers[-1][1]
