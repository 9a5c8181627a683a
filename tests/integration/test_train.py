"""Ray Train + DeepSpeed on a dataset version, into the MLflow registry."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pytest

from app.errors import CheckpointError, ConfigError
from app.model_artifact import INT8, load_model
from app.registry import Registry
from app.settings import Settings, load_settings
from app.workloads import get_workload
from data.versions import DatasetStore
from tests.ray_platform import Platform, Scraped, export_samples
from train.job import samples_per_epoch
from train.metrics import TAG_KEYS
from train.run import TrainOutcome, check_cluster_fits, train_tier

DIGITS = get_workload("digits")
TRAIN_SERIES = "ray_scaledl_train_"


def samples_counted(run_id: str) -> float | None:
    """``ray_scaledl_train_samples_total`` of one run, as the node exports it (a counter
    stays in the export after its process ends)."""
    found = [
        s.value
        for s in export_samples(f"{TRAIN_SERIES}samples")
        if s.name.endswith("_total") and s.labels.get("run_id") == run_id
    ]
    assert len(found) <= 1, f"several series for run {run_id}: {found}"
    return found[0] if found else None


def train_rows(platform: Platform) -> int:
    store = DatasetStore(platform.settings.datasets_dir)
    return store.get("digits", platform.dataset_version).splits["train"]


@pytest.mark.parametrize(("tier", "zero", "floor"), [("cheap", 1, 0.9), ("expensive", 2, 0.95)])
def test_each_tier_trains_to_a_real_accuracy_and_is_registered_with_lineage(
    platform: Platform, tier: str, zero: int, floor: float
) -> None:
    outcome = platform.outcomes[tier]
    assert outcome.metrics["test_accuracy"] >= floor
    assert outcome.metrics["epochs_run"] == 6
    registry = Registry(platform.settings.tracking_uri)
    ref = registry.resolve(f"digits-{tier}", outcome.model.version)
    assert ref.tags["dataset_version"] == platform.dataset_version
    run = registry.client.get_run(ref.run_id)
    assert run.data.tags["git_commit"] and "deepspeed" in run.data.tags["libraries"]
    assert f'"zero_stage":{zero}' in run.data.params["train"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(outcome.metrics["test_accuracy"])
    # Per-step metrics from rank 0, every log_every_steps optimizer steps.
    steps = registry.client.get_metric_history(ref.run_id, "step_loss")
    assert len(steps) >= 6 and all(m.step % 10 == 0 for m in steps)
    model = load_model(registry.download(ref))
    assert (model.meta.tier, model.meta.dataset_version) == (tier, platform.dataset_version)
    # Where the run's time went, in order; what is not training is its fixed cost.
    phases = outcome.phases
    assert list(phases) == [
        "prepare", "workers_start", "engine_init", "first_step", "train", "wind_down",
        "checkpoint_copy", "int8", "test", "register",
    ]  # fmt: skip
    assert all(s >= 0 for s in phases.values()) and phases["train"] > 0
    assert sum(phases.values()) == pytest.approx(outcome.seconds, abs=1.0)
    assert run.data.metrics["fixed_cost_s"] == pytest.approx(outcome.fixed_seconds)
    assert run.data.metrics["phase_engine_init_s"] == pytest.approx(phases["engine_init"])


def test_an_int8_twin_is_registered_beside_each_tier(platform: Platform) -> None:
    registry = Registry(platform.settings.tracking_uri)
    for tier, outcome in platform.outcomes.items():
        int8 = registry.resolve(f"digits-{tier}-int8", outcome.int8.version)
        assert int8.tags["fp32_version"] == outcome.model.version
        assert float(int8.tags["speedup_batch64"]) > 0
        assert abs(outcome.metrics["int8_accuracy_delta"]) <= 0.02
        assert load_model(registry.download(int8)).meta.quantization == INT8


def test_checkpoints_hold_every_ranks_deepspeed_state_and_the_weights(platform: Platform) -> None:
    run = Path(platform.settings.runs_dir) / platform.outcomes["cheap"].run_name
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    # The best ones by val accuracy, plus the latest (kept for resuming).
    assert 1 <= len(checkpoints) <= platform.settings.train.checkpoints_to_keep + 1
    latest = checkpoints[-1]
    assert (latest / "model" / "weights.pt").is_file()
    assert len(list(latest.rglob("*optim_states.pt"))) == 2  # ZeRO-1: one shard per rank


def test_pipeline_and_data_parallel_combine_and_train_as_well_as_data_parallel(
    platform: Platform,
) -> None:
    """4 workers = 2 pipeline stages x 2 data-parallel pipes (half a CPU each fits the
    test cluster): the expensive tier with the global batch of the platform's
    data-parallel run (16 x 2), trained to the same accuracy."""
    settings = load_settings(
        storage_root=platform.settings.storage_root,
        train={"epochs": 6, "num_workers": 4, "cpus_per_worker": 0.5, "pipeline_stages": 2},
    )
    outcome = train_tier(settings, DIGITS, "expensive")
    data_parallel = platform.outcomes["expensive"].metrics["test_accuracy"]
    assert outcome.metrics["test_accuracy"] >= data_parallel - 0.01
    run = Registry(settings.tracking_uri).client.get_run(outcome.model.run_id)
    assert '"pipeline_stages":2' in run.data.params["train"]
    assert '"train_batch_size": 32' in run.data.params["deepspeed"]  # 16 x 2 pipes
    # 4 workers, 2 stages: the run's samples are counted once, not once per stage.
    expected = samples_per_epoch(train_rows(platform), settings.train) * 6
    assert samples_counted(outcome.run_name) == expected
    # Each rank holds its own stage's layers and parameters only (its epoch events say
    # so): the two stages split the layers between them, and their parameters add up
    # to the model's, on each of the 2 pipes.
    held = {e["rank"]: e for e in epoch_events(outcome.run_name) if e["epoch"] == 0}
    whole = sum(p.numel() for p in DIGITS.build_model("expensive").parameters())
    layers = len(DIGITS.layers("expensive"))
    stages = defaultdict(set)
    for rank in held.values():
        stages[rank["stage"]].add((rank["layers"], rank["parameters_held"]))
        assert 0 < rank["parameters_held"] < whole
    assert sorted(stages) == [0, 1] and all(len(s) == 1 for s in stages.values()), stages
    (first, p0), (second, p1) = (next(iter(stages[i])) for i in (0, 1))
    assert (first.split("-")[0], second.split("-")[1]) == ("0", str(layers - 1))
    assert int(first.split("-")[1]) + 1 == int(second.split("-")[0])
    assert p0 + p1 == whole and len(held) == 4
    # The pipeline's loss curve follows data parallel's, epoch by epoch (logged at each
    # epoch's last step; the same global batch gives both the same steps).
    registry = Registry(settings.tracking_uri)
    piped, parallel = (
        {m.step: m.value for m in registry.client.get_metric_history(run_id, "train_loss")}
        for run_id in (outcome.model.run_id, platform.outcomes["expensive"].model.run_id)
    )
    piped.pop(0, None), parallel.pop(0, None)  # the run's summary, logged without a step
    assert sorted(piped) == sorted(parallel) and len(piped) == 6
    for step, loss in piped.items():  # from ~1.3 down to a few hundredths
        assert abs(loss - parallel[step]) <= 0.05 + 0.15 * parallel[step], (piped, parallel)


def test_data_parallel_ranks_hold_the_whole_model(platform: Platform) -> None:
    """ZeRO-1 shards optimizer state, not parameters: each of the cheap run's 2 ranks
    holds every parameter (contrast ZeRO-3 in the killed-worker test)."""
    whole = sum(p.numel() for p in DIGITS.build_model("cheap").parameters())
    events = epoch_events(platform.outcomes["cheap"].run_name)
    assert {e["rank"]: e["parameters_held"] for e in events} == {0: whole, 1: whole}


def epoch_events(run_name: str) -> list[dict]:
    """The train.epoch events every rank of ``run_name`` logged (JSON lines on stderr)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    events = []
    for f in logs.rglob("worker-*.err"):  # rglob: exited workers' logs move to logs/old/
        for line in f.read_text(errors="replace").splitlines():
            if '"train.epoch"' in line and run_name in line:
                event = json.loads(line)
                if event.get("event") == "train.epoch" and event["run_id"] == run_name:
                    events.append(event)
    return events


def test_rank_0_reports_the_runs_progress_to_rays_metrics_export(platform: Platform) -> None:
    """What a dashboard and the training-stalled alert read: the cheap run's series, as
    the node's export showed them while it trained (scraped every 0.5 s)."""
    outcome = platform.outcomes["cheap"]
    tags = {"workload": "digits", "tier": "cheap", "run_id": outcome.run_name}
    series: dict[str, list[Scraped]] = defaultdict(list)
    for s in platform.cheap_training_export.seen:
        if s.labels.get("run_id") == outcome.run_name:
            series[s.name].append(s)
    names = ("loss", "epoch", "last_step_timestamp_seconds", "checkpoint_timestamp_seconds")
    assert set(series) == {f"{TRAIN_SERIES}{n}" for n in names} | {f"{TRAIN_SERIES}samples_total"}
    for name, seen in series.items():
        assert {(k, s.labels[k]) for s in seen for k in TAG_KEYS} == set(tags.items()), name
        # One series per run whatever its two workers: rank 0 reports, once.
        assert len({tuple(sorted(s.labels.items())) for s in seen}) == 1, name

    def values(name: str) -> list[float]:
        return [s.value for s in series[f"{TRAIN_SERIES}{name}"]]

    epochs = values("epoch")
    assert epochs == sorted(epochs) and epochs[-1] == outcome.metrics["epochs_run"] - 1
    steps = series[f"{TRAIN_SERIES}last_step_timestamp_seconds"]
    assert [s.value for s in steps] == sorted(s.value for s in steps)
    # A healthy run: its last step is always recent (the stalled alert stays quiet).
    assert all(0 <= s.at - s.value < 60 for s in steps)
    checkpoints = series[f"{TRAIN_SERIES}checkpoint_timestamp_seconds"]
    assert all(0 <= s.at - s.value < 120 for s in checkpoints)
    assert len({s.value for s in checkpoints}) >= 2  # one per epoch, several seen
    loss = values("loss")
    assert all(v > 0 for v in loss) and loss[-1] < loss[0]
    # Samples: exactly what the run trained, every data-parallel worker counted once.
    expected = samples_per_epoch(train_rows(platform), platform.settings.train) * 6
    assert samples_counted(outcome.run_name) == expected
    assert values("samples_total")[-1] <= expected


def test_a_run_that_stops_stepping_stays_in_the_export_and_leaves_it_when_it_ends(
    ray_cluster: None,
) -> None:
    """Ray drops a gauge not set again within two report intervals (1 s here): a run
    stuck in a collective must keep its last step in the export, or 'training stalled'
    could never fire; once its publisher stops (the run ended) the series goes."""
    import ray

    from train.metrics import LiveFigures, Publisher, RunSeries

    @ray.remote(num_cpus=0)
    def stuck(seconds: float) -> float:
        figures = LiveFigures(data_parallel=1)
        figures.add(16, 0.5, stepped=True)  # one step, then nothing
        publisher = Publisher(figures, RunSeries("digits", "cheap", "stalled-run"))
        publisher.start()
        time.sleep(seconds)
        publisher.close()
        return figures.totals[2]

    def last_steps() -> list[Scraped]:
        return [
            s
            for s in export_samples(f"{TRAIN_SERIES}last_step_timestamp_seconds")
            if s.labels.get("run_id") == "stalled-run"
        ]

    # 10 s: on a loaded host the series took about 3 s to reach the export (the 1 s
    # report interval, then the agent), and showed for only 2.9 s of a 6 s stall.
    ref, seen = stuck.remote(10.0), []
    while not ray.wait([ref], timeout=0.5)[0]:
        seen.extend(last_steps())
    stepped_at = ray.get(ref)
    assert {s.value for s in seen} == {stepped_at}
    assert seen[-1].at - seen[0].at >= 3  # present, unchanged, through 3+ report intervals
    deadline = time.monotonic() + 15
    while last_steps():
        assert time.monotonic() < deadline, "an ended run's gauge stayed in the export"
        time.sleep(0.5)


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered, from the snapshot its checkpoint manager
    writes after each one (a folder on disk may not be registered yet)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return 0
    return len(snapshot["checkpoint_results"])


def _kill_a_worker_after(run_dir: Path, checkpoints: int) -> None:
    """Kill a worker of the run once ``checkpoints`` are registered: early enough that
    training is still running, late enough that there is a checkpoint to resume from.
    The worker is one that logged an epoch of this run (its events carry its pid): an
    earlier run's worker still exiting has the same process title, and killing it
    once left this run untouched (resumed_from_step -1)."""
    deadline = time.monotonic() + 300
    while _registered_checkpoints(run_dir) < checkpoints:
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.1)
    pids = sorted({e["process"] for e in epoch_events(run_dir.name)})
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    assert alive, f"the run's workers {pids} exited before the kill: the run ended first"
    os.kill(alive[0], signal.SIGKILL)


def _train_while_killing(settings: Settings, tier: str, run_name: str) -> TrainOutcome:
    failed: list[BaseException] = []

    def kill() -> None:
        try:
            _kill_a_worker_after(settings.runs_dir / run_name, 1)
        except BaseException as exc:  # the test's failure, not a thread's stray warning
            failed.append(exc)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        return train_tier(settings, DIGITS, tier, run_name=run_name)
    finally:
        killer.join()
        if failed:
            raise failed[0]


def _resume_lines() -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    # rglob: Ray moves the logs of workers that have exited into logs/old/.
    return [
        line
        for f in logs.rglob("worker-*.out")
        for line in f.read_text(errors="replace").splitlines()
        if "[scaledl] resuming from checkpoint" in line
    ]


def test_a_killed_worker_is_replaced_and_training_resumes(platform: Platform) -> None:
    """ZeRO-3 with its parameters and optimizer state offloaded to the CPU (DeepSpeed's
    cpu_adam, JIT-built once into ~/.cache/torch_extensions): each rank holds half of
    every parameter, and a rank killed mid-run is replaced from the sharded checkpoint.
    On this CPU-only machine "offloaded to the CPU" moves no memory: the test proves
    the modes run, shard and resume, not what offloading saves; that needs a GPU, and no
    GPU run of them has been made yet."""
    zero3 = {"zero_stage": 3, "offload_params": True, "offload_optimizer": True}
    settings = load_settings(
        storage_root=platform.settings.storage_root, train={"epochs": 6, **zero3}
    )
    outcome = _train_while_killing(settings, "expensive", "killed-and-recovered")
    resumed_at = outcome.metrics["resumed_from_step"]
    assert resumed_at > 0
    assert any(f"step {resumed_at:.0f}" in line for line in _resume_lines())
    uninterrupted = platform.outcomes["expensive"].metrics["test_accuracy"]
    assert abs(outcome.metrics["test_accuracy"] - uninterrupted) <= 0.01
    whole = sum(p.numel() for p in DIGITS.build_model("expensive").parameters())
    held = [e["parameters_held"] for e in epoch_events("killed-and-recovered")]
    assert held and all(whole / 2 <= h < whole / 2 + 1000 for h in held), (held, whole)


def test_a_stopped_run_continues_with_resume(platform: Platform) -> None:
    """Stopped, then resumed: and streamed, as a split above the cache limit is. Its
    accuracy matches the platform's cheap tier, whose workers kept their data in memory
    for the same 6 epochs, within 1 point."""
    settings = load_settings(
        storage_root=platform.settings.storage_root,
        # No caching: this run streams its shard from Ray Data every epoch. ZeRO-0:
        # plain data parallelism, each rank a whole optimizer (the other stages are the
        # platform's 1 and 2 and the killed-worker test's 3).
        train={"epochs": 6, "max_failures": 0, "cache_inputs_below_mb": 0, "zero_stage": 0},
    )
    with pytest.raises(Exception, match="(?i)fail|died|killed"):
        _train_while_killing(settings, "cheap", "stopped-run")
    with pytest.raises(ConfigError, match="resume it with --workload digits --tier cheap"):
        train_tier(settings, DIGITS, "expensive", resume="stopped-run")
    outcome = train_tier(settings, DIGITS, "cheap", resume="stopped-run")
    assert outcome.metrics["resumed_from_step"] > 0
    assert outcome.metrics["epochs_run"] == 6
    cached = platform.outcomes["cheap"].metrics["test_accuracy"]
    assert abs(outcome.metrics["test_accuracy"] - cached) <= 0.01, (outcome.metrics, cached)
    feeds = {e["feed"] for e in epoch_events("stopped-run")}
    assert feeds == {"streamed"}, feeds
    assert {e["feed"] for e in epoch_events(platform.outcomes["cheap"].run_name)} == {"cached"}


def test_resuming_an_unknown_run_names_the_known_ones(platform: Platform) -> None:
    with pytest.raises(CheckpointError, match="no training run 'nope'.*resume one of"):
        train_tier(platform.settings, DIGITS, "cheap", resume="nope")


def test_a_layout_the_cluster_cannot_place_is_refused_before_training(platform: Platform) -> None:
    settings = load_settings(storage_root=platform.settings.storage_root, train={"num_workers": 8})
    with pytest.raises(ConfigError, match=r"training needs 9 CPUs .* cluster has 4"):
        check_cluster_fits(settings.train)
    with pytest.raises(ConfigError):
        train_tier(settings, DIGITS, "cheap")
    gpu = load_settings(storage_root=platform.settings.storage_root, train={"use_gpu": True})
    with pytest.raises(ConfigError, match="needs 2 GPUs .* the cluster has 0"):
        check_cluster_fits(gpu.train)


def test_calibration_keeps_accuracy_close_to_the_expensive_tier_for_less(
    platform: Platform,
) -> None:
    spec = platform.cascade
    assert spec.margin == 0.005
    assert spec.val.cascade_accuracy >= spec.val.expensive_accuracy - spec.margin
    assert 0 < spec.val.escalated_share < 0.5
    assert spec.test.cascade_accuracy >= spec.test.expensive_accuracy - 0.02
    registry = Registry(platform.settings.tracking_uri)
    ref = registry.resolve("digits-cascade", "champion")
    assert ref.tags["cheap_version"] == spec.cheap_version
    assert registry.resolve("digits-cheap", "champion").version == spec.cheap_version


def test_a_damaged_checkpoint_fails_the_resume_with_a_clear_error(platform: Platform) -> None:
    import shutil

    from app.errors import find_scaledl_error

    runs = Path(platform.settings.runs_dir)
    shutil.copytree(runs / platform.outcomes["cheap"].run_name, runs / "damaged-run")
    job_file = runs / "damaged-run" / "scaledl-job.json"
    job = json.loads(job_file.read_text())
    job["train"]["max_failures"] = 0  # one attempt is enough to fail
    # Its own MLflow run, so the failure does not mark the copied run FAILED.
    registry = Registry(platform.settings.tracking_uri)
    job["mlflow_run_id"] = registry.start_run("damaged-run", params={}, tags={})
    job_file.write_text(json.dumps(job))
    latest = max(p for p in (runs / "damaged-run").glob("checkpoint_*") if p.is_dir())
    for state in latest.rglob("*.pt"):
        state.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as raised:
        train_tier(platform.settings, DIGITS, "cheap", resume="damaged-run")
    found = find_scaledl_error(raised.value)
    assert isinstance(found, CheckpointError), raised.value
    assert "cannot be loaded" in found.message and "without --resume" in found.message
    assert registry.client.get_run(job["mlflow_run_id"]).info.status == "FAILED"
    original = platform.outcomes["cheap"].model.run_id
    assert registry.client.get_run(original).info.status == "FINISHED"


def test_a_new_run_may_not_reuse_an_existing_runs_name(platform: Platform) -> None:
    name = platform.outcomes["cheap"].run_name
    client = Registry(platform.settings.tracking_uri).client
    experiment = client.get_experiment_by_name("scaledl").experiment_id
    before = len(client.search_runs([experiment]))
    with pytest.raises(ConfigError, match=f"continue it with --resume {name}"):
        train_tier(platform.settings, DIGITS, "cheap", run_name=name)
    assert len(client.search_runs([experiment])) == before  # no MLflow run left open


def test_a_seeded_run_is_reproducible(ray_cluster: None, tmp_path: Path) -> None:
    """Two runs of one config with one seed on one version give the same figures, down to
    every logged step: Ray deals a split's blocks to the workers in order (run._fit),
    and every shuffle is seeded (feeds.Feed). The runs stream (cache 0), and the version
    is ingested from four files, so that each split has several blocks to deal out: the
    dealing is Ray's, and what could change under us. A slice a worker keeps, and its
    shuffles, are checked without Ray (tests/unit/test_feeds.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.pipeline import ingest
    from data.sources import open_source

    frame = DIGITS.builtin_source()
    for i, part in enumerate(np.array_split(np.arange(len(frame)), 4)):
        path = tmp_path / "raw" / f"part-{i}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame.iloc[part], preserve_index=False), path)
    settings = load_settings(
        storage_root=tmp_path / "store", train={"epochs": 2, "cache_inputs_below_mb": 0}, seed=7
    )
    version = ingest(settings, DIGITS, open_source(tmp_path / "raw")).manifest.version
    train_dir = DatasetStore(settings.datasets_dir).split_dir("digits", version, "train")
    assert len(list(train_dir.glob("*.parquet"))) == 4

    registry = Registry(settings.tracking_uri)
    runs = [train_tier(settings, DIGITS, "cheap", run_name=f"seeded-{i}") for i in (1, 2)]
    steps = [
        [(m.step, m.value) for m in registry.client.get_metric_history(r.model.run_id, "step_loss")]
        for r in runs
    ]
    figures = ("train_loss", "val_accuracy", "test_accuracy", "int8_test_accuracy", "test_ece")
    first, second = ({k: r.metrics[k] for k in figures} for r in runs)
    assert first == second
    assert steps[0] == steps[1] and len(steps[0]) >= 5
