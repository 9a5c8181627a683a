"""Score trained models on a dataset split.

Several models score in one pass, so their answers stay row-aligned and the split is
read once; only the label and each model's prediction and confidence come back.

A split whose model inputs fit the cache limit (``train.cache_inputs_below_mb``, the
limit under which a training worker keeps its share as tensors) is scored in this
process. Ray Data would first start its executor and a task process that imports torch
and loads the models: on digits' test split, 2.9 s against 0.1 s once the models are
loaded. A larger split is scored as Ray Data tasks, which land on the cluster's pooled
worker processes; each process loads the models once and keeps them for the pass's
other blocks. An actor pool would start a process of its own first: about 1 s more per
call, after every training run (digits: median 5.0 s against 4.0 s, 5 interleaved pairs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from app.model_artifact import LoadedModel, load_model
from app.settings import Settings
from data.splits import read_split, split_in_row_groups
from data.versions import DatasetManifest
from train.job import rows_in_cache_limit

CALIBRATION_BINS = 15
BATCH_ROWS = 1024  # rows a model scores at once

ModelDirs = tuple[tuple[str, str], ...]  # (name, model directory), hashable


@functools.lru_cache(maxsize=2)  # one score() call's models; a later call's replace them
def _loaded(model_dirs: ModelDirs) -> dict[str, LoadedModel]:
    return {name: load_model(Path(d)) for name, d in model_dirs}


def _score_batch(batch: pd.DataFrame, *, model_dirs: ModelDirs) -> dict[str, np.ndarray]:
    return _predict(batch, _loaded(model_dirs))


def _predict(batch: pd.DataFrame, models: dict[str, LoadedModel]) -> dict[str, np.ndarray]:
    workload = next(iter(models.values())).workload
    features = workload.features(batch)
    out = {"label": batch[workload.label_column].to_numpy(dtype=np.int64)}
    for name, model in models.items():
        probs = model.predict_proba_features(features)
        out[f"{name}.pred"] = probs.argmax(axis=1)
        out[f"{name}.confidence"] = probs.max(axis=1)
    return out


@dataclass(frozen=True)
class Scores:
    label: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray

    @property
    def accuracy(self) -> float:
        return float((self.label == self.pred).mean()) if len(self.label) else float("nan")

    @property
    def expected_calibration_error(self) -> float:
        """Mean |accuracy - confidence| over equal-width confidence bins, weighted by size."""
        bins = np.minimum((self.confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
        correct = (self.label == self.pred).astype(float)
        error = 0.0
        for b in np.unique(bins):
            mask = bins == b
            error += mask.mean() * abs(correct[mask].mean() - self.confidence[mask].mean())
        return float(error)


def score(
    settings: Settings,
    manifest: DatasetManifest,
    split: str,
    model_dirs: dict[str, Path],
    *,
    num_cpus: float = 0.5,
) -> dict[str, Scores]:
    """Every model's predictions on every row of a dataset version's split."""
    if manifest.splits.get(split, 0) < rows_in_cache_limit(manifest.workload, settings.train):
        models = {name: load_model(Path(d)) for name, d in model_dirs.items()}
        # In batches, as Ray Data's tasks score: a CNN's activations are many times
        # the size of its inputs, which alone are held to the limit.
        parts = [
            _predict(rows.iloc[start : start + BATCH_ROWS], models)
            for rows in split_in_row_groups(settings, manifest, split)
            for start in range(0, len(rows), BATCH_ROWS)
        ]
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    else:
        out = (
            read_split(settings, manifest, split)
            .map_batches(
                _score_batch,
                fn_kwargs={"model_dirs": tuple((k, str(v)) for k, v in model_dirs.items())},
                batch_format="pandas",
                batch_size=1024,
                num_cpus=num_cpus,
            )
            .to_pandas()
        )
    label = np.asarray(out["label"])
    return {
        name: Scores(label, np.asarray(out[f"{name}.pred"]), np.asarray(out[f"{name}.confidence"]))
        for name in model_dirs
    }
