"""TrainConfig -> DeepSpeed config, and layouts refused before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.errors import ConfigError
from app.sections import TrainConfig
from app.workloads import get_workload
from train.deepspeed_config import build_deepspeed_config
from train.job import samples_per_epoch, steps_per_epoch
from train.run import check_layout


def test_global_batch_is_micro_batch_times_accumulation_times_data_parallel() -> None:
    cfg = TrainConfig(num_workers=4, pipeline_stages=2, micro_batch_size=16, grad_accumulation=3)
    ds = build_deepspeed_config(cfg, total_steps=100)
    assert cfg.data_parallel == 2
    assert ds["train_batch_size"] == 16 * 3 * 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert ds["scheduler"]["params"]["total_num_steps"] == 100


def test_precision_follows_the_device() -> None:
    cpu = build_deepspeed_config(TrainConfig(), total_steps=10)
    gpu = build_deepspeed_config(TrainConfig(use_gpu=True), total_steps=10)
    assert (cpu["bf16"]["enabled"], cpu["fp16"]["enabled"]) == (False, False)
    assert gpu["bf16"]["enabled"] is True


def test_offload_uses_deepspeeds_cpu_optimizer_and_zero3_offloads_params() -> None:
    cfg = TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True)
    ds = build_deepspeed_config(cfg, total_steps=10)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert ds["optimizer"]["params"]["torch_adam"] is False
    assert build_deepspeed_config(TrainConfig(), total_steps=10)["optimizer"]["params"][
        "torch_adam"
    ]


def test_steps_per_epoch_counts_equal_shares_and_accumulation() -> None:
    assert steps_per_epoch(1271, TrainConfig(num_workers=2, micro_batch_size=16)) == 39
    assert steps_per_epoch(1271, TrainConfig(num_workers=2, grad_accumulation=2)) == 19
    assert steps_per_epoch(1271, TrainConfig(num_workers=2, pipeline_stages=2)) == 79
    # Whole accumulation windows only; none at all is 0 (train_tier refuses the run).
    assert steps_per_epoch(40, TrainConfig(num_workers=2, grad_accumulation=2)) == 0


def test_samples_per_epoch_counts_every_group_and_drops_partial_windows() -> None:
    assert samples_per_epoch(1271, TrainConfig(num_workers=2)) == 39 * 16 * 2
    assert (
        samples_per_epoch(1271, TrainConfig(num_workers=2, grad_accumulation=2)) == 19 * 2 * 16 * 2
    )
    assert samples_per_epoch(1271, TrainConfig(num_workers=2, pipeline_stages=2)) == 79 * 16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"zero_stage": 2, "pipeline_stages": 2}, "DeepSpeed pipelines take ZeRO stage 0 or 1"),
        ({"num_workers": 2, "pipeline_stages": 3}, "needs at least that many workers"),
        ({"num_workers": 3, "pipeline_stages": 2}, "workers = stages x data parallel"),
        ({"offload_params": True, "zero_stage": 2}, "offload_params needs train.zero_stage=3"),
        ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer needs"),
        ({"precision": "fp16"}, "fp16 needs train.use_gpu=true"),
    ],
)
def test_impossible_layouts_are_refused_naming_the_keys(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**fields)


def test_more_stages_than_layers_is_refused() -> None:
    digits = get_workload("digits")
    check_layout(digits, "cheap", TrainConfig(num_workers=3, pipeline_stages=3))
    with pytest.raises(ConfigError, match="digits-cheap has only 3 layers"):
        check_layout(digits, "cheap", TrainConfig(num_workers=4, pipeline_stages=4))


def test_a_worker_keeps_a_split_by_its_nodes_memory_unless_told_a_limit() -> None:
    """digits: 65 float32 values a row. Unset, the limit is 5 % of this node's memory
    (a share of 1 M rows: 124 MB on 2 workers); a set limit wins; on a pipeline's stages
    every worker reads the whole split."""
    from ray._common.utils import get_system_memory

    from train.job import CACHE_SHARE_OF_NODE_MEMORY, cache_limit_mb, keeps_in_memory

    auto = TrainConfig()
    assert cache_limit_mb(auto) == pytest.approx(
        CACHE_SHARE_OF_NODE_MEMORY * get_system_memory() / 2**20
    )
    per_worker_mb = 1_000_000 / 2 * 65 * 4 / 2**20
    assert keeps_in_memory("digits", 1_000_000, auto) == (per_worker_mb < cache_limit_mb(auto))
    assert not keeps_in_memory("digits", 1_000_000, TrainConfig(cache_inputs_below_mb=100))
    assert keeps_in_memory("digits", 1_000_000, TrainConfig(cache_inputs_below_mb=200))
    piped = TrainConfig(num_workers=2, pipeline_stages=2, cache_inputs_below_mb=200)
    assert not keeps_in_memory("digits", 1_000_000, piped)  # 248 MB: the whole split
    assert not keeps_in_memory("digits", 10, TrainConfig(cache_inputs_below_mb=0))


def test_a_streamed_split_is_shuffled_over_a_window_the_cache_limit_bounds() -> None:
    """A split just over the limit streams, but is shuffled over a third of the rows the
    limit holds (100 MB of 65 float32 a row: Ray's shuffle buffer holds up to 3 windows
    at a time); with no limit, 8 micro-batches."""
    from train.job import keeps_in_memory, shuffle_window

    limited = TrainConfig(cache_inputs_below_mb=100)
    assert not keeps_in_memory("digits", 1_000_000, limited)
    assert shuffle_window("digits", limited) == int(100 * 2**20 / (65 * 4) / 3) > 130_000
    assert (
        shuffle_window("digits", TrainConfig(cache_inputs_below_mb=0, micro_batch_size=32)) == 256
    )


def test_a_version_too_small_for_one_optimizer_step_is_refused_with_what_to_change(
    tmp_path: Path,
) -> None:
    """1 training row, 2 workers x micro batch 16: not one step. Refused before an MLflow
    run or a worker exists (the registry is never reached)."""
    from app.settings import load_settings
    from tests.unit.test_split_and_versions import published
    from train.run import _new_job

    settings = load_settings(storage_root=tmp_path)
    published(settings.datasets_dir, "abc123")
    with pytest.raises(
        ConfigError,
        match=r"has 1 training rows, fewer than one optimizer step of 32 .*"
        r"lower train.micro_batch_size",
    ):
        _new_job(settings, get_workload("digits"), "cheap", "latest", "run", registry=None)  # type: ignore[arg-type]
