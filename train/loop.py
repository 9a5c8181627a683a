"""The per-worker training loop (runs inside Ray Train workers).

Short and made of named helpers, like Ray's own DeepSpeed example: set up the engine,
resume from a checkpoint if Ray hands one over, train, evaluate on the validation shard,
report with a checkpoint every epoch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from app.model_artifact import ModelMeta, save_model
from app.settings import TrainConfig
from app.workloads import get_workload

log = logging.getLogger("scaledl.train")

MODEL_DIR = "model"


class TrainJob(BaseModel):
    """Everything a worker needs; crosses the Ray boundary as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str
    tier: str
    dataset_version: str
    seed: int
    train: TrainConfig
    deepspeed: dict[str, Any]


def to_model_inputs(batch: pd.DataFrame, *, workload_name: str) -> dict[str, np.ndarray]:
    """Raw rows -> model inputs ``x`` and labels ``y`` (a Ray Data batch transform)."""
    workload = get_workload(workload_name)
    return {
        "x": workload.features(batch),
        "y": batch[workload.label_column].to_numpy(dtype=np.int64),
    }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    import ray.train
    import torch

    job = TrainJob.model_validate(config)
    torch.manual_seed(job.seed)
    torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    engine = setup_engine(job)
    start_epoch = load_checkpoint(engine)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, job.train.epochs):
        metrics = {"epoch": epoch, **train_epoch(engine, train_shard, job, epoch)}
        metrics.update(evaluate_shard(engine, val_shard))
        report_and_checkpoint(engine, job, metrics, epoch)
    return metrics


def setup_engine(job: TrainJob) -> Any:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model = get_workload(job.workload).build_model(job.tier)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=job.deepspeed
    )
    return engine


def load_checkpoint(engine: Any) -> int:
    """Resume from the checkpoint Ray hands over (after a failure); returns the next epoch."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory)
    epoch = int(client_state["epoch"]) + 1
    log.warning("resuming from checkpoint at epoch %d (global step %d)", epoch, engine.global_steps)
    print(f"[scaledl] resuming from checkpoint: epoch {epoch}, step {engine.global_steps}")
    return epoch


def train_epoch(engine: Any, shard: Any, job: TrainJob, epoch: int) -> dict[str, float]:
    import torch.nn.functional as F

    engine.train()
    started, rows, loss_sum = time.perf_counter(), 0, 0.0
    batches = shard.iter_torch_batches(
        batch_size=job.train.micro_batch_size,
        drop_last=True,
        local_shuffle_buffer_size=job.train.micro_batch_size * 8,
        local_shuffle_seed=job.seed + epoch,
    )
    for batch in batches:
        loss = F.cross_entropy(engine(batch["x"]), batch["y"])
        engine.backward(loss)
        engine.step()
        rows += len(batch["y"])
        loss_sum += float(loss) * len(batch["y"])
    seconds = time.perf_counter() - started
    return {
        "train_loss": loss_sum / max(rows, 1),
        "samples_per_s": rows / seconds if seconds > 0 else 0.0,
        "lr": float(engine.get_lr()[0]),
        "global_step": int(engine.global_steps),
    }


def evaluate_shard(engine: Any, shard: Any) -> dict[str, float]:
    """Validation loss/accuracy over every worker's shard (summed across workers)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, rows
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=256):
            logits = engine(batch["x"])
            totals[0] += F.cross_entropy(logits, batch["y"], reduction="sum").item()
            totals[1] += (logits.argmax(1) == batch["y"]).sum().item()
            totals[2] += len(batch["y"])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, rows = totals.tolist()
    return {"val_loss": loss_sum / max(rows, 1), "val_accuracy": correct / max(rows, 1)}


def report_and_checkpoint(
    engine: Any, job: TrainJob, metrics: dict[str, float], epoch: int
) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds plain weights for serving."""
    import ray.train
    from ray.train import Checkpoint

    directory = Path(tempfile.mkdtemp(prefix="scaledl-ckpt-"))
    try:
        engine.save_checkpoint(str(directory), client_state={"epoch": epoch})
        if ray.train.get_context().get_world_rank() == 0:
            meta = ModelMeta(
                workload=job.workload, tier=job.tier, dataset_version=job.dataset_version
            )
            save_model(directory / MODEL_DIR, engine.module, meta)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
