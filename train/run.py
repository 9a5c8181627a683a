"""Driver side of training: dataset version -> TorchTrainer -> evaluation -> registry."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.errors import CheckpointError, ConfigError
from app.logs import event as log_event
from app.logs import events
from app.registry import ModelRef, Registry
from app.sections import TrainConfig
from app.settings import Settings
from app.workloads import Workload, get_workload
from data.splits import head_of_split, load_preprocessor, read_split
from data.versions import DatasetManifest, DatasetStore
from train.deepspeed_config import build_deepspeed_config
from train.evaluate import score
from train.feeds import SPLITS, to_model_inputs
from train.job import TrainJob, shuffle_window, steps_per_epoch
from train.loop import MODEL_DIR, train_loop_per_worker
from train.quantize import CALIBRATION_ROWS, int8_variant

# Ray Data needs a CPU beside the trainers to stream shards, or training stalls.
SPARE_CPUS_FOR_DATA = 1.0
# How often Ray Train's controller polls its workers (Ray's default: 2 s). A run takes
# several polls to wind down once its workers return: 5 s of every run at 2 s, 1.2 s at
# 0.5 s (digits, 2 workers). A poll is one small call per worker. Set the variable
# yourself to choose another interval; the controller reads it from the driver's env.
CONTROLLER_POLL_S = "0.5"
JOB_FILE = "scaledl-job.json"


@dataclass(frozen=True)
class TrainOutcome:
    tier: str
    model: ModelRef
    int8: ModelRef
    metrics: dict[str, float]
    run_name: str
    checkpoints: int
    seconds: float
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def fixed_seconds(self) -> float:
        """What the run cost besides its steps (setup before the first, wind-down,
        scoring and registration after the last)."""
        return self.seconds - self.phases.get("train", 0.0)


class Phases:
    """Seconds of each phase of one run, in the order they ran. The workers' part comes
    from the Unix times they report (loop.Timeline); the driver's is timed here.

    - ``prepare``: the checks, the MLflow run, the job;
    - ``workers_start``: Ray Train's controller and worker group, torch's process group;
    - ``engine_init``: DeepSpeed's import and ``initialize``, a resume's checkpoint load;
    - ``first_step``: the first read of the data and the first step;
    - ``train``: first step to last, with each epoch's validation and checkpoint;
    - ``wind_down``: the last validation and checkpoint, the workers' exit;
    - ``checkpoint_copy``, ``int8``, ``test``, ``register``: after ``fit``.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.at = time.time()

    def mark(self, name: str, at: float | None = None) -> None:
        """``name`` ran from the previous mark until ``at`` (now)."""
        at = time.time() if at is None else at
        self.seconds[name] = round(max(0.0, at - self.at), 3)
        self.at = at

    def workers(self, reported: dict[str, Any]) -> None:
        """The workers' phases, from the times the last report carried (a run that
        recovered from a failure: its last worker group's)."""
        for name, key in (
            ("workers_start", "worker_started_at"),
            ("engine_init", "engine_ready_at"),
            ("first_step", "first_step_at"),
            ("train", "last_step_at"),
        ):
            self.mark(name, float(reported[key]))
        self.mark("wind_down")


def train_tier(
    settings: Settings,
    workload: Workload,
    tier: str,
    *,
    dataset_ref: str = "latest",
    run_name: str | None = None,
    resume: str | None = None,
) -> TrainOutcome:
    """Train one tier with Ray Train + DeepSpeed, score it, register it and its INT8 twin.

    ``resume`` names an earlier run: it continues from that run's latest checkpoint with
    that run's own configuration.
    """
    started, phases = time.perf_counter(), Phases()
    registry = Registry(settings.tracking_uri, settings.artifacts_dir)
    if resume:
        job, run_name = _load_job(settings, resume), resume
        if (job.workload, job.tier) != (workload.name, tier):
            raise ConfigError(
                f"run {resume} trained {job.workload}-{job.tier}, not {workload.name}-{tier}: "
                f"resume it with --workload {job.workload} --tier {job.tier}"
            )
        check_cluster_fits(job.train)
    else:
        run_name = run_name or f"{workload.name}-{tier}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        if (settings.runs_dir / run_name).exists():
            raise ConfigError(
                f"a training run named {run_name!r} already exists under {settings.runs_dir}: "
                f"continue it with --resume {run_name}, or pick another --run-name"
            )
        check_cluster_fits(settings.train)  # before an MLflow run exists to be left open
        job = _new_job(settings, workload, tier, dataset_ref, run_name, registry)
    manifest = DatasetStore(settings.datasets_dir).get(workload.name, job.dataset_version)
    try:
        phases.mark("prepare")
        result = _fit(settings, manifest, job, run_name)
        phases.workers(result.metrics)
        outcome = _evaluate_and_register(
            settings, registry, manifest, job, run_name, result, phases
        )
        outcome = dataclasses.replace(
            outcome, seconds=time.perf_counter() - started, phases=phases.seconds
        )
        registry.log_metrics(
            job.mlflow_run_id,
            {"fixed_cost_s": outcome.fixed_seconds}
            | {f"phase_{name}_s": s for name, s in phases.seconds.items()},
        )
    except BaseException:
        registry.finish_run(job.mlflow_run_id, status="FAILED")
        raise
    registry.finish_run(job.mlflow_run_id)
    log_event(
        events("train"),
        "train.phases",
        run_id=run_name,
        mlflow_run_id=job.mlflow_run_id,
        workload=job.workload,
        tier=job.tier,
        seconds=round(outcome.seconds, 3),
        fixed_seconds=round(outcome.fixed_seconds, 3),
        **{f"{name}_s": s for name, s in phases.seconds.items()},
    )
    return outcome


def check_cluster_fits(cfg: TrainConfig) -> None:
    """Refuse a layout the cluster cannot place, instead of hanging in the scheduler."""
    import ray

    resources = ray.cluster_resources()
    if cfg.use_gpu and resources.get("GPU", 0.0) < cfg.num_workers:
        raise ConfigError(
            f"train.use_gpu needs {cfg.num_workers} GPUs (one per worker) but the cluster has "
            f"{resources.get('GPU', 0.0):g}: lower train.num_workers, add GPU nodes, or set "
            "train.use_gpu=false (SCALEDL_TRAIN__USE_GPU)"
        )
    total = resources.get("CPU", 0.0)
    needed = cfg.num_workers * cfg.cpus_per_worker + SPARE_CPUS_FOR_DATA
    if total < needed:
        raise ConfigError(
            f"training needs {needed:g} CPUs ({cfg.num_workers} workers x "
            f"{cfg.cpus_per_worker:g} + {SPARE_CPUS_FOR_DATA:g} for Ray Data) but the cluster "
            f"has {total:g}: lower train.num_workers or train.cpus_per_worker "
            "(SCALEDL_TRAIN__NUM_WORKERS, SCALEDL_TRAIN__CPUS_PER_WORKER) or add nodes"
        )


def check_layout(workload: Workload, tier: str, cfg: TrainConfig) -> None:
    layers = len(workload.layers(tier))
    if cfg.pipeline_stages > layers:
        raise ConfigError(
            f"train.pipeline_stages={cfg.pipeline_stages} but {workload.name}-{tier} has only "
            f"{layers} layers: use at most {layers} stages"
        )


def _new_job(
    settings: Settings,
    workload: Workload,
    tier: str,
    dataset_ref: str,
    run_name: str,
    registry: Registry,
) -> TrainJob:
    workload.check_tier(tier)
    cfg = settings.train
    check_layout(workload, tier, cfg)
    manifest = DatasetStore(settings.datasets_dir).get(workload.name, dataset_ref)
    preprocessor = load_preprocessor(settings, manifest)
    steps = steps_per_epoch(manifest.splits["train"], cfg)
    if steps < 1:
        global_batch = cfg.micro_batch_size * cfg.grad_accumulation * cfg.data_parallel
        raise ConfigError(
            f"dataset {workload.name} {manifest.version} has {manifest.splits['train']} "
            f"training rows, fewer than one optimizer step of {global_batch} (micro batch x "
            "accumulation x data parallel): ingest more rows, or lower train.micro_batch_size "
            "or train.grad_accumulation"
        )
    total_steps = steps * cfg.epochs
    deepspeed = build_deepspeed_config(cfg, total_steps=total_steps)
    tags = {
        "workload": workload.name,
        "tier": tier,
        "dataset_version": manifest.version,
        "train_run": run_name,
        "git_commit": _git_commit(),
        "libraries": _library_versions(),
    }
    run_id = registry.start_run(
        run_name,
        params={
            "train": cfg.model_dump_json(),
            "deepspeed": json.dumps(deepspeed),
            "seed": settings.seed,
        },
        tags=tags,
    )
    job = TrainJob(
        workload=workload.name,
        tier=tier,
        dataset_version=manifest.version,
        train_rows=manifest.splits["train"],
        val_rows=manifest.splits["val"],
        seed=settings.seed,
        train=cfg,
        deepspeed=deepspeed,
        tracking_uri=settings.tracking_uri,
        mlflow_run_id=run_id,
        preprocessor=preprocessor.model_dump() if preprocessor else None,
        shuffle_rows=shuffle_window(workload.name, cfg),
    )
    run_dir = settings.runs_dir / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_FILE).write_text(job.model_dump_json(indent=2))
    return job


def _load_job(settings: Settings, run_name: str) -> TrainJob:
    path = settings.runs_dir / run_name / JOB_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in settings.runs_dir.glob(f"*/{JOB_FILE}"))
        raise CheckpointError(
            f"no training run {run_name!r} under {settings.runs_dir}: resume one of "
            f"{', '.join(known[-5:]) or '(none yet)'}"
        )
    return TrainJob.model_validate_json(path.read_text())


def _fit(settings: Settings, manifest: DatasetManifest, job: TrainJob, run_name: str) -> Any:
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    os.environ.setdefault(HEALTH_CHECK_INTERVAL_S_ENV_VAR, CONTROLLER_POLL_S)
    cfg = job.train
    # Where the workers read a cached split themselves (train/feeds.py): the version's
    # folders, on the storage root every node shares. Taken now, not from the job file:
    # a resumed run reads the root it is given.
    store = DatasetStore(settings.datasets_dir)
    folders = {s: str(store.split_dir(job.workload, job.dataset_version, s)) for s in SPLITS}
    job = job.model_copy(update={"split_dirs": folders})
    datasets = {split: _model_inputs(settings, manifest, split, job) for split in SPLITS}
    # A streamed split's blocks reach the workers in the dataset's order, and are dealt
    # out in that order, so a seeded run reads the same rows in the same order every time.
    # (Locality hints, which would deal by where blocks live, are off with it.)
    ordered = ExecutionOptions(preserve_order=True)
    # Every stage of a pipe reads the whole split (see engines.Pipeline).
    split = "all" if cfg.pipeline_stages == 1 else []
    data_config = DataConfig(datasets_to_split=split, execution_options=ordered)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            label_selector=cfg.node_labels or None,  # the training pool of a cluster
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(settings.runs_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=data_config,
    )
    return trainer.fit()


def _model_inputs(settings: Settings, manifest: DatasetManifest, split: str, job: TrainJob) -> Any:
    """The split as model inputs, lazily, for workers that stream it; workers that keep
    their slice read it from the files themselves (feeds.Feed) and never start it."""
    return read_split(settings, manifest, split).map_batches(
        to_model_inputs,
        fn_kwargs={
            "workload_name": manifest.workload,
            "preprocessor": job.preprocessor_json,
        },
        batch_format="pandas",
    )


def _evaluate_and_register(
    settings: Settings,
    registry: Registry,
    manifest: DatasetManifest,
    job: TrainJob,
    run_name: str,
    result: Any,
    phases: Phases,
) -> TrainOutcome:
    """Score the best checkpoint and its INT8 twin on the test split; register both."""
    best, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    final = result.metrics
    name = get_workload(job.workload).registered_model_name(job.tier)
    tags = {"dataset_version": job.dataset_version, "workload": job.workload, "tier": job.tier}
    with tempfile.TemporaryDirectory(prefix="scaledl-model-") as tmp:
        model_dir = Path(tmp) / MODEL_DIR
        with best.as_directory() as checkpoint_dir:
            shutil.copytree(Path(checkpoint_dir) / MODEL_DIR, model_dir)
        phases.mark("checkpoint_copy")
        calibration = head_of_split(settings, manifest, "val", CALIBRATION_ROWS)
        int8 = int8_variant(model_dir, Path(tmp) / "int8", calibration)
        phases.mark("int8")
        both = score(settings, manifest, "test", {"fp32": model_dir, "int8": int8.directory})
        phases.mark("test")
        scores, int8_scores = both["fp32"], both["int8"]
        metrics = {
            "test_accuracy": scores.accuracy,
            "test_ece": scores.expected_calibration_error,
            "val_accuracy": float(best_metrics["val_accuracy"]),
            "best_epoch": float(best_metrics["epoch"]),
            "epochs_run": float(final["epoch"]) + 1,
            "train_loss": float(final["train_loss"]),
            "samples_per_s": float(final["samples_per_s"]),
            "resumed_from_step": float(final["resumed_from_step"]),
            "int8_test_accuracy": int8_scores.accuracy,
            "int8_accuracy_delta": int8_scores.accuracy - scores.accuracy,
            "int8_speedup_batch64": int8.speedup,
        }
        registry.log_metrics(job.mlflow_run_id, metrics)
        model = registry.register(name, model_dir, run_id=job.mlflow_run_id, tags=tags)
        int8_ref = registry.register(
            f"{name}-int8",
            int8.directory,
            run_id=job.mlflow_run_id,
            artifact_path="model-int8",
            tags={
                **tags,
                "fp32_version": model.version,
                "accuracy_delta": f"{metrics['int8_accuracy_delta']:+.4f}",
                "speedup_batch64": f"{int8.speedup:.2f}",
            },
        )
    phases.mark("register")
    checkpoints = len(
        [p for p in (settings.runs_dir / run_name).glob("checkpoint_*") if p.is_dir()]
    )
    return TrainOutcome(job.tier, model, int8_ref, metrics, run_name, checkpoints, seconds=0.0)


def _library_versions() -> str:
    from importlib.metadata import version

    names = ("ray", "torch", "deepspeed", "mlflow-skinny", "pyarrow", "pandas")
    return json.dumps({n: version(n) for n in names})


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
