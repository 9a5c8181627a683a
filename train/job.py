"""A training run as its workers see it: the job, and how one epoch of it divides into
micro-batches and optimizer steps.

The driver (train/run.py) writes the job; the workers' loop (train/loop.py) and engines
(train/engines.py) read it. The batch arithmetic lives here only, so that the DeepSpeed
scheduler's step count, the engines' loops, the run's sample counts and the tests agree.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.sections import TrainConfig
from app.workloads import get_workload


class TrainJob(BaseModel):
    """Everything a worker needs; crosses the Ray boundary as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str
    tier: str
    dataset_version: str
    train_rows: int
    val_rows: int
    seed: int
    train: TrainConfig
    deepspeed: dict[str, Any]
    tracking_uri: str
    mlflow_run_id: str
    preprocessor: dict[str, Any] | None = None  # fitted with the dataset version, if any
    shuffle_rows: int = 0  # a streamed split's shuffle window (shuffle_window); 0: 8 batches
    split_dirs: dict[str, str] = {}  # split -> its folder, set for the run (run._fit)

    @property
    def preprocessor_json(self) -> str | None:
        """The fitted preprocessor as the feature transform takes it (cached per process)."""
        return json.dumps(self.preprocessor) if self.preprocessor else None

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.train_rows, self.train)

    @property
    def micro_batches_per_epoch(self) -> int:
        return micro_batches_per_epoch(self.train_rows, self.train)

    def caches(self, rows: int) -> bool:
        """Whether a worker keeps its share of a split of ``rows`` as tensors."""
        return keeps_in_memory(self.workload, rows, self.train)


def micro_batches_per_group(rows: int, cfg: TrainConfig) -> int:
    """Whole micro-batches of a split that each data-parallel group gets: an equal
    share, the remainder dropped. (With pipeline stages, a group is one pipe.)"""
    return rows // (cfg.micro_batch_size * cfg.data_parallel)


def steps_per_epoch(rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch, the same on every rank: whole accumulation windows
    only, so that an epoch (and the checkpoint after it) never ends half-accumulated."""
    return micro_batches_per_group(rows, cfg) // cfg.grad_accumulation


def micro_batches_per_epoch(rows: int, cfg: TrainConfig) -> int:
    """Micro-batches each data-parallel group runs per epoch."""
    return steps_per_epoch(rows, cfg) * cfg.grad_accumulation


def samples_per_epoch(rows: int, cfg: TrainConfig) -> int:
    """Samples one epoch trains on, every data-parallel group together."""
    return micro_batches_per_epoch(rows, cfg) * cfg.micro_batch_size * cfg.data_parallel


# A worker keeps a split in memory up to this share of its node's memory, unless
# train.cache_inputs_below_mb says otherwise: 1.2 GB of a 24 GB node, 6 of a 128 GB one.
CACHE_SHARE_OF_NODE_MEMORY = 0.05


def keeps_in_memory(workload: str, rows: int, cfg: TrainConfig) -> bool:
    """Whether what a worker reads of a split of ``rows`` is small enough to keep as
    tensors instead of streaming it every epoch: its share under data parallelism, the
    whole split on a pipeline's stages. Asked on each worker, of its own node; the run
    keeps a split only where all of them can (train/feeds.py, ``open_feeds``)."""
    share = rows if cfg.pipeline_stages > 1 else rows / cfg.data_parallel
    return share < rows_in_cache_limit(workload, cfg)


def shuffle_window(workload: str, cfg: TrainConfig) -> int:
    """Rows a worker that streams its split shuffles among: a third of what the cache
    limit holds (Ray's shuffling batcher fills to 1.5 windows and copies them as it
    compacts, so memory stays within the limit), and never fewer than 8 micro-batches.
    Taken once, on the driver (``TrainJob.shuffle_rows``): a pipeline's stages must
    shuffle alike, whatever the memory of the nodes they run on."""
    return max(8 * cfg.micro_batch_size, int(rows_in_cache_limit(workload, cfg) / 3))


def rows_in_cache_limit(workload: str, cfg: TrainConfig) -> float:
    width = get_workload(workload).input_width + 1  # the features and the label, float32
    return cache_limit_mb(cfg) * 2**20 / (width * 4)


def cache_limit_mb(cfg: TrainConfig) -> float:
    """``train.cache_inputs_below_mb``, or a share of this node's memory (the container's
    limit where there is one, as Ray reads it)."""
    if cfg.cache_inputs_below_mb is not None:
        return cfg.cache_inputs_below_mb
    from ray._common.utils import get_system_memory

    return CACHE_SHARE_OF_NODE_MEMORY * get_system_memory() / 2**20
