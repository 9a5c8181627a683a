"""Feature preprocessing fitted on the training split, and the column statistics.

A :class:`Preprocessor` standardises numeric features with the training split's mean and
standard deviation, and one-hot encodes categorical ones over a vocabulary learned from
the training split, with slot 0 for values it never saw. Its width is fixed by the
workload (each vocabulary has a maximum size), so the model's shape does not depend on
the data. It is saved as JSON with the dataset version and with every model trained on
it; training, evaluation and serving all call the same ``transform``.

:func:`column_stats` describes each column of a split (counts, quantiles, a histogram or
the top values), streamed in batches: the drift monitor compares live traffic against it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

OOV = "<oov>"  # slot 0 of every vocabulary
SAMPLE_ROWS = 100_000
HISTOGRAM_BINS = 20
TOP_VALUES = 20
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


class Preprocessor(BaseModel):
    """Fitted feature transform: standardised numerics, then one-hot categoricals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str
    numeric: dict[str, tuple[float, float]]  # feature -> (mean, std) on the training split
    vocabularies: dict[str, list[str]]  # feature -> [OOV, seen values...], most frequent first
    sizes: dict[str, int]  # feature -> slots in its one-hot block (max vocabulary + OOV)

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(self.sizes.values())

    def transform(self, derived: pd.DataFrame) -> np.ndarray:
        """Derived feature columns -> a float32 matrix (n, width)."""
        n = len(derived)
        out = np.zeros((n, self.width), dtype=np.float32)
        for j, (name, (mean, std)) in enumerate(self.numeric.items()):
            values = derived[name].to_numpy(dtype=np.float64)
            out[:, j] = (values - mean) / std
        offset = len(self.numeric)
        rows = np.arange(n)
        for name, vocabulary in self.vocabularies.items():
            index = {v: i for i, v in enumerate(vocabulary)}
            slots = derived[name].map(index).fillna(0).to_numpy(dtype=np.int64)
            out[rows, offset + slots] = 1.0
            offset += self.sizes[name]
        return out


class _Moments:
    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        self.n += len(values)
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())

    def mean_std(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 1.0
        mean = self.total / self.n
        var = max(self.squares / self.n - mean * mean, 0.0)
        return mean, float(np.sqrt(var)) or 1.0


def fit_preprocessor(
    workload: str,
    derived_batches: Iterable[pd.DataFrame],
    *,
    numeric: tuple[str, ...],
    categorical: Mapping[str, int],
) -> Preprocessor:
    """Fit on the training split's derived features, one batch at a time.

    ``categorical`` maps a feature to its largest vocabulary; rarer values than the
    ``size``-th most frequent fall into the out-of-vocabulary slot.
    """
    moments = {name: _Moments() for name in numeric}
    counts: dict[str, Counter] = {name: Counter() for name in categorical}
    for batch in derived_batches:
        for name, m in moments.items():
            m.add(batch[name].to_numpy(dtype=np.float64))
        for name, c in counts.items():
            c.update(batch[name].dropna().astype(str).value_counts().to_dict())
    vocabularies = {
        name: [OOV, *sorted(c, key=lambda v: (-c[v], v))[: categorical[name]]]
        for name, c in counts.items()
    }
    return Preprocessor(
        workload=workload,
        numeric={name: m.mean_std() for name, m in moments.items()},
        vocabularies=vocabularies,
        sizes={name: size + 1 for name, size in categorical.items()},
    )


class ColumnStats(BaseModel):
    """One column of a split: exact counts; quantiles and histogram from a uniform sample."""

    model_config = ConfigDict(extra="forbid")

    rows: int
    nulls: int
    kind: str  # "numeric", "hour_of_day" (of a timestamp column) or "categorical"
    mean: float | None = None
    quantiles: dict[str, float] | None = None
    histogram: dict[str, list[float]] | None = None  # {"edges": [...], "counts": [...]}
    top_values: dict[str, int] | None = None
    distinct: int | None = None


def column_stats(
    batches: Iterable[pd.DataFrame], *, numeric: list[str], categorical: list[str], rows: int
) -> dict[str, ColumnStats]:
    """Streamed statistics of ``rows`` rows arriving in ``batches``."""
    rate = min(1.0, SAMPLE_ROWS / max(rows, 1))
    rng = np.random.default_rng(0)
    samples: dict[str, list[np.ndarray]] = {c: [] for c in numeric}
    moments = {c: _Moments() for c in numeric}
    nulls = dict.fromkeys([*numeric, *categorical], 0)
    seen = 0
    counts: dict[str, Counter] = {c: Counter() for c in categorical}
    times: set[str] = set()
    for batch in batches:
        seen += len(batch)
        times |= {c for c in numeric if pd.api.types.is_datetime64_any_dtype(batch[c])}
        keep = rng.random(len(batch)) < rate
        for c in numeric:
            values = _as_float(batch[c])
            nulls[c] += int(np.isnan(values).sum())
            moments[c].add(values)
            samples[c].append(values[keep & ~np.isnan(values)])
        for c in categorical:
            nulls[c] += int(batch[c].isna().sum())
            counts[c].update(batch[c].dropna().astype(str).value_counts().to_dict())
    out: dict[str, ColumnStats] = {}
    for c in numeric:
        sample = np.concatenate(samples[c]) if samples[c] else np.empty(0)
        mean = moments[c].mean_std()[0] if moments[c].n else None
        kind = "hour_of_day" if c in times else "numeric"
        out[c] = ColumnStats(rows=seen, nulls=nulls[c], kind=kind, mean=mean, **_numeric(sample))
    for c in categorical:
        top = dict(counts[c].most_common(TOP_VALUES))
        out[c] = ColumnStats(
            rows=seen,
            nulls=nulls[c],
            kind="categorical",
            top_values=top,
            distinct=len(counts[c]),
        )
    return out


def _as_float(values: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(values):
        return values.dt.hour.to_numpy(dtype=np.float64)  # the time of day is what drifts
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)


def _numeric(sample: np.ndarray) -> dict[str, Any]:
    if len(sample) == 0:
        return {}
    quantiles = {
        f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(sample, QUANTILES), strict=True)
    }
    low, high = np.quantile(sample, [0.005, 0.995])
    if high <= low:
        low, high = float(sample.min()), float(sample.max()) + 1.0
    counts, edges = np.histogram(np.clip(sample, low, high), bins=HISTOGRAM_BINS, range=(low, high))
    return {
        "quantiles": quantiles,
        "histogram": {"edges": edges.round(6).tolist(), "counts": counts.astype(float).tolist()},
    }
