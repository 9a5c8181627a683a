"""The on-disk form of a trained tier: plain weights plus what is needed to rebuild it.

Training writes it, the registry stores it, evaluation and serving load it. Weights are a
``state_dict`` (no pickled code), so loading runs only the workload's own model code.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from app.errors import ModelNotFound
from app.workloads import Workload, get_workload

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS = "weights.pt"
META = "model.json"
PREPROCESSOR = "preprocessor.json"  # the features fitted with the dataset, if the workload has one
INT8 = "static-int8"  # the twins training registers now
DYNAMIC_INT8 = "dynamic-int8"  # twins registered before 2026-11-29 still load
INT8_WEIGHTS = "weights-int8.pt"  # a static twin's int8 weights and activation scales
INT8_ENGINE = "x86"  # torch's quantized backend for this CPU (fbgemm + onednn)


@dataclass(frozen=True)
class ModelMeta:
    """What rebuilds the model: the workload's tier, its data, how to run the weights.

    ``quantization`` None runs the fp32 weights; ``"static-int8"`` runs the int8 weights
    and activation scales calibrated at training (``weights-int8.pt``: convolutions and
    linear layers in int8); ``"dynamic-int8"`` (older twins) quantizes the linear layers'
    weights when the model loads.
    """

    workload: str
    tier: str
    dataset_version: str
    quantization: str | None = None


def save_weights(
    directory: Path,
    weights: dict[str, torch.Tensor],
    meta: ModelMeta,
    *,
    preprocessor: dict | None = None,
) -> Path:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(weights, directory / WEIGHTS)
    (directory / META).write_text(json.dumps(asdict(meta), indent=2))
    if preprocessor is not None:
        (directory / PREPROCESSOR).write_text(json.dumps(preprocessor, indent=2))
    return directory


def save_model(
    directory: Path, module: nn.Module, meta: ModelMeta, *, preprocessor: dict | None = None
) -> Path:
    return save_weights(directory, module.state_dict(), meta, preprocessor=preprocessor)


@dataclass
class LoadedModel:
    """A tier ready to predict: raw rows in, class probabilities out."""

    module: nn.Module
    meta: ModelMeta
    workload: Workload

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(features, np.float32)))
            return torch.softmax(logits, dim=1).numpy()

    def predict_proba(self, raw: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Raw rows: a frame of the feature columns, or their values (n, F) as a request
        carries them; the model's own preprocessor (if any) turns them into features."""
        return self.predict_proba_features(self.workload.features(raw))


def load_model(directory: Path) -> LoadedModel:
    import torch

    if not (directory / META).is_file() or not (directory / WEIGHTS).is_file():
        raise ModelNotFound(
            f"{directory} holds no model ({META} + {WEIGHTS}): register the model again"
        )
    meta = ModelMeta(**json.loads((directory / META).read_text()))
    preprocessor = directory / PREPROCESSOR
    workload = get_workload(
        meta.workload, json.loads(preprocessor.read_text()) if preprocessor.is_file() else None
    )
    if workload.fitted and workload.preprocessor is None:
        raise ModelNotFound(
            f"{directory} holds a {meta.workload} model without its {PREPROCESSOR}: register "
            "the model again from its training run"
        )
    module = workload.build_model(meta.tier)
    module.load_state_dict(torch.load(directory / WEIGHTS, weights_only=True))
    module.eval()
    if meta.quantization == INT8:
        if not (directory / INT8_WEIGHTS).is_file():
            raise ModelNotFound(f"{directory} is an INT8 twin without {INT8_WEIGHTS}")
        module = quantize_static(module, torch.zeros(1, workload.input_width))
        with warnings.catch_warnings():  # torch's own quantized-tensor loader warns
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")
            module.load_state_dict(torch.load(directory / INT8_WEIGHTS, weights_only=True))
    elif meta.quantization == DYNAMIC_INT8:
        module = quantize_dynamic(module)
    elif meta.quantization is not None:
        raise ModelNotFound(f"{directory}: unknown quantization {meta.quantization!r}")
    return LoadedModel(module, meta, workload)


def quantize_static(module: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """Static INT8 (torch's FX graph mode, x86 backend): int8 weights, and activations
    quantized with scales observed on ``calibration`` (model inputs, (n, input_width)).

    Loading a twin runs this on one row of zeros to rebuild the module's form, then
    loads the calibrated scales and weights over it.
    """
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = INT8_ENGINE
    with warnings.catch_warnings(), _no_node_stack_traces():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, still works
        prepared = prepare_fx(
            module.eval(), get_default_qconfig_mapping(INT8_ENGINE), (calibration[:1],)
        )
        with torch.inference_mode():
            for batch in torch.split(calibration, 256):
                prepared(batch)
        return convert_fx(prepared)


_FX_CONFIG = threading.Lock()  # replicas load models in threads (serve_graphs/tier_model.py)


@contextlib.contextmanager
def _no_node_stack_traces() -> Iterator[None]:
    """FX tracing without a Python stack trace on every node (``torch.fx.config``): the
    first trace of a process symbolized them for 1.3 s (the INT8 twin of digits-cheap,
    2.6 s -> 1.2 s), after every training run and at every cold start of an INT8
    replica. Only an error inside tracing loses them. The flag is the process's: the
    lock keeps two loads from leaving it set for good."""
    import torch.fx.config

    with _FX_CONFIG:
        saved = torch.fx.config.do_not_emit_stack_traces
        torch.fx.config.do_not_emit_stack_traces = True
        try:
            yield
        finally:
            torch.fx.config.do_not_emit_stack_traces = saved


def quantize_dynamic(module: nn.Module) -> nn.Module:
    """Dynamic INT8: Linear weights stored as int8, activations quantized per batch."""
    import torch
    from torch import nn

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, still works
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
