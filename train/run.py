"""Driver side of training: dataset version -> TorchTrainer -> evaluation -> registry."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.errors import ConfigError
from app.registry import ModelRef, Registry
from app.settings import Settings, TrainConfig
from app.workloads import Workload
from data.pipeline import read_split
from data.versions import DatasetManifest, DatasetStore
from train.deepspeed_config import build_deepspeed_config, steps_per_epoch
from train.evaluate import score
from train.loop import MODEL_DIR, TrainJob, to_model_inputs, train_loop_per_worker

# Ray Data needs a CPU beside the trainers to stream shards, or training stalls.
SPARE_CPUS_FOR_DATA = 1.0


@dataclass(frozen=True)
class TrainOutcome:
    tier: str
    model: ModelRef
    metrics: dict[str, float]
    run_name: str
    seconds: float


def train_tier(
    settings: Settings,
    workload: Workload,
    tier: str,
    *,
    dataset_ref: str = "latest",
    run_name: str | None = None,
) -> TrainOutcome:
    """Train one tier with Ray Train + DeepSpeed, score it on the test split, register it."""
    started = time.perf_counter()
    workload.check_tier(tier)
    cfg = settings.train
    manifest = DatasetStore(settings.datasets_dir).get(workload.name, dataset_ref)
    check_cluster_fits(cfg)
    run_name = run_name or f"{workload.name}-{tier}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    job = TrainJob(
        workload=workload.name,
        tier=tier,
        dataset_version=manifest.version,
        seed=settings.seed,
        train=cfg,
        deepspeed=build_deepspeed_config(
            cfg, total_steps=steps_per_epoch(manifest.splits["train"], cfg) * cfg.epochs
        ),
    )
    result = _fit(settings, manifest, job, run_name)
    with tempfile.TemporaryDirectory(prefix="scaledl-model-") as tmp:
        model_dir = Path(tmp) / MODEL_DIR
        with result.checkpoint.as_directory() as checkpoint_dir:
            shutil.copytree(Path(checkpoint_dir) / MODEL_DIR, model_dir)
        test = score(read_split(settings, manifest, "test"), model_dir)
        metrics = {
            "test_accuracy": test.accuracy,
            "test_ece": test.expected_calibration_error,
            "val_accuracy": float(result.metrics["val_accuracy"]),
            "train_loss": float(result.metrics["train_loss"]),
            "samples_per_s": float(result.metrics["samples_per_s"]),
            "epochs": float(result.metrics["epoch"]) + 1,
        }
        ref = Registry(settings.tracking_uri, settings.artifacts_dir).register(
            workload.registered_model_name(tier),
            model_dir,
            params={"train": cfg.model_dump_json(), "deepspeed": job.deepspeed, "run": run_name},
            metrics=metrics,
            tags={
                "workload": workload.name,
                "tier": tier,
                "dataset_version": manifest.version,
                "train_run": run_name,
                "git_commit": _git_commit(),
            },
        )
    return TrainOutcome(tier, ref, metrics, run_name, time.perf_counter() - started)


def check_cluster_fits(cfg: TrainConfig) -> None:
    """Refuse a layout the cluster cannot place, instead of hanging in the scheduler."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    needed = cfg.num_workers * cfg.cpus_per_worker + SPARE_CPUS_FOR_DATA
    if not cfg.use_gpu and total < needed:
        raise ConfigError(
            f"training needs {needed:g} CPUs ({cfg.num_workers} workers x "
            f"{cfg.cpus_per_worker:g} + {SPARE_CPUS_FOR_DATA:g} for Ray Data) but the cluster "
            f"has {total:g}: lower train.num_workers or train.cpus_per_worker "
            "(SCALEDL_TRAIN__NUM_WORKERS, SCALEDL_TRAIN__CPUS_PER_WORKER) or add nodes"
        )


def _fit(settings: Settings, manifest: DatasetManifest, job: TrainJob, run_name: str):  # noqa: ANN202
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = job.train
    datasets = {split: _model_inputs(settings, manifest, split, cfg) for split in ("train", "val")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(settings.runs_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def _model_inputs(settings: Settings, manifest: DatasetManifest, split: str, cfg: TrainConfig):  # noqa: ANN202
    """The split as model inputs, streamed; small ones are computed once, not every epoch."""
    from app.workloads import get_workload

    dataset = read_split(settings, manifest, split).map_batches(
        to_model_inputs, fn_kwargs={"workload_name": manifest.workload}, batch_format="pandas"
    )
    width = len(get_workload(manifest.workload).feature_columns) + 1
    megabytes = manifest.splits[split] * width * 4 / 2**20
    return dataset.materialize() if megabytes < cfg.cache_inputs_below_mb else dataset


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
