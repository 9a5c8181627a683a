"""TrainConfig -> the DeepSpeed config dict. The only place such a dict is written."""

from __future__ import annotations

from typing import Any

from app.settings import TrainConfig


def steps_per_epoch(train_rows: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: equal shares per worker, last partial batch dropped."""
    return max(1, (train_rows // cfg.num_workers) // cfg.micro_batch_size)


def build_deepspeed_config(cfg: TrainConfig, *, total_steps: int) -> dict[str, Any]:
    warmup = max(1, total_steps // 10)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * cfg.num_workers,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's fused CPU Adam needs a ~50 s JIT build and only
            # pays off with optimizer offload.
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": warmup,
                "total_num_steps": max(total_steps, warmup + 1),
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
