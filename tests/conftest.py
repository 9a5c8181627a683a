"""Shared helpers for every tier. Tiers add their own conftest (Ray, subprocesses)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.settings import Settings, load_settings
from app.workloads import get_workload


class FakeClock:
    """A clock a test moves by hand: ``clock.now += 5``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SCALEDL_* or RAY_ADDRESS from the caller's shell leaks into a test."""
    import os

    for key in list(os.environ):
        if key.startswith("SCALEDL_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path, clean_env: None) -> Settings:
    return load_settings(storage_root=tmp_path / "store")


@pytest.fixture(scope="session")
def digits_frame() -> pd.DataFrame:
    return get_workload("digits").builtin_source()


def corrupt(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, str]]:
    """Break five rows of a digits frame in five ways; returns the frame and id -> rule."""
    # px_05 arrives as text, as a CSV export or a sloppy producer would write it.
    bad = frame.astype({"px_05": str, "px_06": "float64"}).copy()
    broken = {
        int(bad.loc[1, "id"]): "px_03: in_range(0, 16)",
        int(bad.loc[2, "id"]): "label: isin([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])",
        int(bad.loc[3, "id"]): "px_06: is_integer",
        int(bad.loc[4, "id"]): "px_05: not_nullable",
        int(bad.loc[5, "id"]): "px_05: coerce_dtype('float64')",
    }
    bad.loc[1, "px_03"] = 17
    bad.loc[2, "label"] = 11
    bad.loc[3, "px_06"] = 2.5
    bad.loc[4, "px_05"] = None
    bad.loc[5, "px_05"] = "smudge"
    return bad, broken


__all__ = ["corrupt", "free_port", "np"]
