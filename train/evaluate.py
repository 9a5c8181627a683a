"""Score a trained tier on a dataset split with Ray Data batch inference.

The model loads once per inference actor; only three small columns per row (label,
prediction, confidence) come back to the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.model_artifact import load_model

CALIBRATION_BINS = 15


class _Scorer:
    def __init__(self, model_dir: str) -> None:
        self.model = load_model(Path(model_dir))

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        workload = self.model.workload
        probs = self.model.predict_proba_features(workload.features(batch))
        return {
            "label": batch[workload.label_column].to_numpy(dtype=np.int64),
            "pred": probs.argmax(axis=1),
            "confidence": probs.max(axis=1),
        }


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


def score(dataset: Any, model_dir: Path, *, num_cpus: float = 0.5) -> Scores:
    """Predict every row of ``dataset`` (a Ray Dataset of raw rows) with the model."""
    import ray.data

    frame = dataset.map_batches(
        _Scorer,
        fn_constructor_kwargs={"model_dir": str(model_dir)},
        batch_format="pandas",
        batch_size=1024,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=num_cpus,
    ).to_pandas()
    return Scores(
        frame["label"].to_numpy(), frame["pred"].to_numpy(), frame["confidence"].to_numpy()
    )
