"""Deterministic train/val/test assignment: a row's split depends only on its id and the seed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data.versions import SPLITS


def assign_split(ids: pd.Series, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Hash each id (keyed by the seed) to [0, 1) and cut at the cumulative fractions."""
    key = f"scaledl{seed:09d}"[-16:]
    hashed = pd.util.hash_pandas_object(ids.astype(str), index=False, hash_key=key).to_numpy()
    unit = hashed / np.float64(2**64)
    edges = np.cumsum(fractions)[:-1]
    return np.asarray(SPLITS, dtype=object)[np.searchsorted(edges, unit, side="right")]
