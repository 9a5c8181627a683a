from app.settings import TrainConfig
from train.deepspeed_config import build_deepspeed_config, steps_per_epoch


def test_global_batch_is_micro_batch_times_workers() -> None:
    cfg = TrainConfig(num_workers=2, micro_batch_size=16, zero_stage=2)
    ds = build_deepspeed_config(cfg, total_steps=100)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 32
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["bf16"]["enabled"] is False  # CPU trains in fp32


def test_steps_per_epoch_drops_the_partial_batch_per_worker() -> None:
    cfg = TrainConfig(num_workers=2, micro_batch_size=16)
    assert steps_per_epoch(1271, cfg) == 39  # 635 rows per worker -> 39 full batches
