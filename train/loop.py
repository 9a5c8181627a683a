"""The per-worker training loop (runs inside Ray Train workers).

Short and made of named helpers, like Ray's own DeepSpeed example: set up the engine,
resume from the checkpoint Ray hands over, train, evaluate on the validation split,
report (with a checkpoint every N epochs), stop early when validation stops improving.
Rank 0 publishes the run's live series meanwhile (train/metrics.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import CheckpointError
from app.logs import event as log_event
from app.logs import events
from app.model_artifact import ModelMeta, save_weights
from app.registry import Registry
from train.engines import DataParallel, Pipeline, build_engine
from train.feeds import open_feeds
from train.job import TrainJob
from train.metrics import LiveFigures, published

log = logging.getLogger("scaledl.train")

MODEL_DIR = "model"


@dataclass
class Timeline:
    """Unix times of this worker's run, sent with every report, so that the driver can
    tell the fixed costs (start, DeepSpeed, the first read) from training
    (train/run.py, ``Phases``)."""

    worker_started_at: float
    engine_ready_at: float = 0.0
    first_step_at: float = 0.0
    last_step_at: float = 0.0

    def epoch(self, figures: dict[str, float]) -> dict[str, float]:
        """An epoch's figures without its step times, which go here."""
        first, last = figures.pop("first_step_at"), figures.pop("last_step_at")
        self.first_step_at = self.first_step_at or first
        self.last_step_at = last or self.last_step_at
        return figures


@dataclass
class Progress:
    """What a checkpoint carries besides the weights, so a resumed run continues exactly."""

    next_epoch: int = 0
    best_val_accuracy: float = -1.0
    epochs_without_improvement: int = 0
    resumed_from_step: int = -1


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, float]:
    timeline = Timeline(worker_started_at=time.time())
    import torch

    job = TrainJob.model_validate(config)
    torch.manual_seed(job.seed)
    torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    train, val = open_feeds(job)
    trainer = build_engine(job)
    progress = load_checkpoint(trainer)
    timeline.engine_ready_at = time.time()
    step_log = mlflow_step_logger(job)
    # What of the model this rank holds, and whether it keeps its data or streams it:
    # fixed for the run.
    held = {**trainer.held(), "feed": train.kind}
    live = LiveFigures(job.train.data_parallel)
    metrics: dict[str, float] = {}
    with published(live, job.workload, job.tier):
        for epoch in range(progress.next_epoch, job.train.epochs):
            live.epoch = epoch
            figures = timeline.epoch(trainer.train_epoch(train, epoch, step_log, live))
            metrics = {"epoch": epoch, **figures}
            metrics.update(trainer.evaluate(val))
            metrics.update(global_step=trainer.engine.global_steps, **track(progress, metrics))
            stop = should_stop(progress, job.train.early_stopping_patience)
            checkpoint = stop or epoch + 1 == job.train.epochs or _due(epoch, job)
            step_log(trainer.engine.global_steps, metrics)
            epoch_event(job, metrics, held)
            reported = {**metrics, **vars(timeline)}
            report_and_checkpoint(trainer, job, reported, progress, checkpoint=checkpoint)
            if checkpoint:
                live.checkpointed()
            if stop:
                break
    return metrics


def epoch_event(job: TrainJob, metrics: dict[str, float], held: dict[str, int | str]) -> None:
    """Every rank's JSON line for an epoch, in its worker's log (app/logs.py): the run,
    the rank and the step, so a stalled or diverging rank shows in the logs too; and
    what of the model the rank holds (``engines.*.held``: its pipeline stage and layers,
    its parameters), so the layout can be checked from the logs; and whether it keeps
    its train split in memory or streams it (``feed``: cached or streamed)."""
    import ray.train

    context = ray.train.get_context()
    figures = {
        k: round(float(v), 6) for k, v in metrics.items() if k not in ("epoch", "global_step")
    }
    log_event(
        events("train"),
        "train.epoch",
        run_id=context.get_experiment_name(),
        mlflow_run_id=job.mlflow_run_id,
        workload=job.workload,
        tier=job.tier,
        rank=context.get_world_rank(),
        epoch=int(metrics["epoch"]),
        step=int(metrics["global_step"]),
        **held,
        **figures,
    )


def should_stop(progress: Progress, patience: int | None) -> bool:
    """Early stopping: ``patience`` epochs in a row without a better val accuracy."""
    return patience is not None and progress.epochs_without_improvement >= patience


def track(progress: Progress, metrics: dict[str, float]) -> dict[str, float]:
    """Update early-stopping state after an epoch; returns what the report should carry."""
    progress.next_epoch = int(metrics["epoch"]) + 1
    if metrics["val_accuracy"] > progress.best_val_accuracy:
        progress.best_val_accuracy = metrics["val_accuracy"]
        progress.epochs_without_improvement = 0
    else:
        progress.epochs_without_improvement += 1
    return {
        "best_val_accuracy": progress.best_val_accuracy,
        "resumed_from_step": progress.resumed_from_step,
    }


def _due(epoch: int, job: TrainJob) -> bool:
    return (epoch + 1) % job.train.checkpoint_every_epochs == 0


def load_checkpoint(trainer: DataParallel | Pipeline) -> Progress:
    """Resume from the checkpoint Ray hands over (after a failure, or `--resume`)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as directory:
        try:
            path, client_state = trainer.engine.load_checkpoint(directory)
        except Exception as exc:  # DeepSpeed raises several kinds for a damaged folder
            raise CheckpointError(
                f"checkpoint {checkpoint.path} cannot be loaded ({exc}): delete it or start "
                "a fresh run without --resume"
            ) from exc
        if path is None:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds no DeepSpeed state: delete it or start "
                "a fresh run without --resume"
            )
    progress = Progress(**client_state["progress"])
    progress.resumed_from_step = int(trainer.engine.global_steps)
    message = (
        f"resuming from checkpoint at epoch {progress.next_epoch}, "
        f"step {progress.resumed_from_step}"
    )
    log.warning(message)
    print(f"[scaledl] {message}", flush=True)
    return progress


def mlflow_step_logger(job: TrainJob):  # noqa: ANN201 - a StepLog
    """Rank 0 logs step metrics into the run's MLflow run; other ranks log nothing."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return lambda step, metrics: None
    registry = Registry(job.tracking_uri)

    def log_step(step: int, metrics: dict[str, float]) -> None:
        registry.log_metrics(job.mlflow_run_id, metrics, step=step)

    return log_step


def report_and_checkpoint(
    trainer: DataParallel | Pipeline,
    job: TrainJob,
    metrics: dict[str, float],
    progress: Progress,
    *,
    checkpoint: bool,
) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds the full weights for serving."""
    import ray.train
    from ray.train import Checkpoint

    if not checkpoint:
        ray.train.report(metrics)
        return
    directory = Path(tempfile.mkdtemp(prefix="scaledl-ckpt-"))
    try:
        trainer.engine.save_checkpoint(str(directory), client_state={"progress": vars(progress)})
        weights = trainer.full_state_dict()  # collective: every rank takes part
        if ray.train.get_context().get_world_rank() == 0:
            meta = ModelMeta(
                workload=job.workload, tier=job.tier, dataset_version=job.dataset_version
            )
            save_weights(directory / MODEL_DIR, weights, meta, preprocessor=job.preprocessor)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
