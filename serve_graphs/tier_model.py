"""TierModel: one model tier as a batched, independently scaled Serve deployment."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from mlflow.exceptions import MlflowException
from ray import serve
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.model_artifact import LoadedModel, load_model
from app.registry import Registry
from app.settings import BatchConfig
from serve_graphs.args import TierConfig, TierModelRef
from serve_graphs.cascade import Instances, concat, take

log = logging.getLogger("ray.serve")
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


def _rows(batches: list[Instances]) -> int:
    """Batch size in rows, not requests: one 64-row request fills a 64-row batch."""
    return sum(len(b) for b in batches)


@serve.deployment
class TierModel:
    """The model version comes with ``user_config`` (:class:`TierConfig`), not with the
    constructor: Serve applies a changed one with ``reconfigure`` on the running replica,
    which loads the new version beside the old one and then swaps them, so requests keep
    being answered throughout (a hot swap)."""

    def __init__(self, tracking_uri: str) -> None:
        import torch

        # Requests are small: one intra-op thread per replica beats threads fighting
        # over the replica's CPU share. Scale out with replicas instead.
        torch.set_num_threads(1)
        self.tracking_uri = tracking_uri
        self.runner: TierRunner | None = None
        self.loaded: TierModelRef | None = None
        self.max_rows = BatchConfig().max_batch_size

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

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def predict_batch(self, batches: list[Instances]) -> list[tuple[np.ndarray, str]]:
        runner = self.runner  # one version for the whole batch, even if a swap lands now
        return [(probs, runner.version) for probs in runner.predict_many(batches)]

    async def predict(self, instances: Instances) -> tuple[np.ndarray, str]:
        """Probabilities (n, C) for raw rows, and the version that produced them.

        A request larger than a batch is split into batch-sized chunks, which join other
        requests' rows in the batcher."""
        step = self.max_rows
        chunks = [take(instances, slice(i, i + step)) for i in range(0, len(instances), step)]
        for _ in range(MAX_STRADDLES):
            answers = await asyncio.gather(*(self.predict_batch(c) for c in chunks))
            # Chunks that straddled a swap run again, so one version answers them all.
            if len({version for _, version in answers}) == 1:
                break
        return np.concatenate([probs for probs, _ in answers]), answers[-1][1]
