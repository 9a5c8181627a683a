"""The INT8 twin of a trained tier: static quantization, measured against fp32."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from app.model_artifact import INT8, INT8_WEIGHTS, META, ModelMeta, load_model, quantize_static

SPEED_BATCH = 64
CALIBRATION_ROWS = 2048  # rows of the val split that set the activations' int8 scales
SPEED_SECONDS = 0.5  # the whole timing, both models: it runs after every training run
SPEED_ROUNDS = 7


@dataclass(frozen=True)
class Int8Variant:
    directory: Path
    speedup: float  # fp32 time / int8 time for one forward pass of SPEED_BATCH rows


def int8_variant(
    model_dir: Path, out_dir: Path, calibration_rows: pd.DataFrame | np.ndarray
) -> Int8Variant:
    """Write the INT8 variant of ``model_dir`` and time it against fp32.

    Static quantization: the activations' int8 scales are observed on
    ``calibration_rows`` (raw rows, as a request carries them; from a split the model
    is not scored on), and stored with the int8 weights in ``weights-int8.pt``.
    Convolutions run in int8 too, which dynamic quantization leaves in fp32.
    """
    import torch

    shutil.copytree(model_dir, out_dir)
    meta = ModelMeta(**json.loads((model_dir / META).read_text()))
    fp32 = load_model(model_dir)
    features = fp32.workload.features(calibration_rows)
    quantized = quantize_static(fp32.module, torch.from_numpy(np.asarray(features, np.float32)))
    torch.save(quantized.state_dict(), out_dir / INT8_WEIGHTS)
    int8_meta = dataclasses.replace(meta, quantization=INT8)
    (out_dir / META).write_text(json.dumps(dataclasses.asdict(int8_meta), indent=2))
    return Int8Variant(out_dir, speedup(model_dir, out_dir))


def speedup(fp32_dir: Path, int8_dir: Path) -> float:
    """fp32 time / INT8 time for one forward pass of SPEED_BATCH rows, on one thread.

    The two models take turns, SPEED_ROUNDS times, and the median round's ratio counts:
    whatever else the shared machine runs meanwhile slows both sides of a round alike.
    """
    import torch

    fp32, int8 = load_model(fp32_dir), load_model(int8_dir)
    batch = torch.rand(SPEED_BATCH, fp32.workload.input_width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as a serving replica has
    try:
        with torch.inference_mode():
            warm = _seconds_per_call(fp32.module, batch, 10)
            _seconds_per_call(int8.module, batch, 10)
            calls = max(1, int(SPEED_SECONDS / (2 * SPEED_ROUNDS) / max(warm, 1e-6)))
            ratios = [
                _seconds_per_call(fp32.module, batch, calls)
                / _seconds_per_call(int8.module, batch, calls)
                for _ in range(SPEED_ROUNDS)
            ]
        return float(statistics.median(ratios))
    finally:
        torch.set_num_threads(threads)


def _seconds_per_call(module, batch, calls: int) -> float:  # noqa: ANN001
    started = time.perf_counter()
    for _ in range(calls):
        module(batch)
    return (time.perf_counter() - started) / calls
