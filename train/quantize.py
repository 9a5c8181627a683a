"""The INT8 twin of a trained tier: dynamic quantization, measured against fp32."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from app.model_artifact import INT8, META, ModelMeta, load_model

SPEED_BATCH = 64
SPEED_SECONDS = 1.0


@dataclass(frozen=True)
class Int8Variant:
    directory: Path
    speedup: float  # fp32 time / int8 time for one forward pass of SPEED_BATCH rows


def int8_variant(model_dir: Path, out_dir: Path) -> Int8Variant:
    """Write the INT8 variant of ``model_dir`` (same weights, quantized on load) and time it.

    Dynamic quantization is a pure function of the fp32 weights, so the variant stores
    those weights and a flag; serving and evaluation quantize when they load it.
    """
    shutil.copytree(model_dir, out_dir)
    meta = ModelMeta(**json.loads((model_dir / META).read_text()))
    int8_meta = dataclasses.replace(meta, quantization=INT8)
    (out_dir / META).write_text(json.dumps(dataclasses.asdict(int8_meta), indent=2))
    return Int8Variant(out_dir, _speedup(model_dir, out_dir))


def _speedup(fp32_dir: Path, int8_dir: Path) -> float:
    import torch

    fp32, int8 = load_model(fp32_dir), load_model(int8_dir)
    batch = torch.rand(SPEED_BATCH, fp32.workload.input_width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as a serving replica has
    try:
        return _seconds_per_call(fp32.module, batch) / _seconds_per_call(int8.module, batch)
    finally:
        torch.set_num_threads(threads)


def _seconds_per_call(module, batch) -> float:  # noqa: ANN001
    import torch

    with torch.inference_mode():
        for _ in range(10):
            module(batch)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < SPEED_SECONDS:
            module(batch)
            calls += 1
    return (time.perf_counter() - started) / calls
