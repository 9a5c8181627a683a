"""TierModel: one model tier as a batched, independently scaled Serve deployment."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from app.model_artifact import LoadedModel, load_model
from app.registry import Registry
from app.settings import BatchConfig
from serve_graphs.args import TierArgs
from serve_graphs.cascade import Instances, concat, take

log = logging.getLogger("ray.serve")


class TierRunner:
    """The Ray-free part: a loaded model version that turns raw rows into probabilities."""

    def __init__(self, model: LoadedModel, version: str) -> None:
        self.model = model
        self.version = version

    @classmethod
    def from_registry(cls, args: TierArgs) -> TierRunner:
        registry = Registry(args.tracking_uri)
        ref = registry.resolve(args.registered_name, args.model_ref)
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
    def __init__(self, args: dict) -> None:
        import torch

        # Requests are small: one intra-op thread per replica beats threads fighting
        # over the replica's CPU share. Scale out with replicas instead.
        torch.set_num_threads(1)
        self.runner = TierRunner.from_registry(TierArgs.model_validate(args))
        self.max_rows = BatchConfig().max_batch_size
        log.info("tier loaded %s", self.runner.version)

    def reconfigure(self, user_config: dict) -> None:
        cfg = BatchConfig.model_validate(user_config)
        self.max_rows = cfg.max_batch_size
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def predict_batch(self, batches: list[Instances]) -> list[np.ndarray]:
        return self.runner.predict_many(batches)

    async def predict(self, instances: Instances) -> tuple[np.ndarray, str]:
        """Probabilities (n, C) for raw rows, and the version that produced them.

        A request larger than a batch is split into batch-sized chunks, which join other
        requests' rows in the batcher."""
        step = self.max_rows
        chunks = [take(instances, slice(i, i + step)) for i in range(0, len(instances), step)]
        probs = await asyncio.gather(*(self.predict_batch(c) for c in chunks))
        return np.concatenate(probs), self.runner.version
