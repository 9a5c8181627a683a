"""TrainConfig -> the DeepSpeed config dict. The only place such a dict is written."""

from __future__ import annotations

from typing import Any

from app.sections import TrainConfig


def build_deepspeed_config(cfg: TrainConfig, *, total_steps: int) -> dict[str, Any]:
    warmup = max(1, int(total_steps * cfg.warmup_fraction))
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accumulation * cfg.data_parallel,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW unless offloading: DeepSpeed's CPU Adam needs a ~50 s JIT build
            # and only pays off when optimizer state lives on the CPU.
            "params": {
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "torch_adam": not cfg.offload_optimizer,
            },
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
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
