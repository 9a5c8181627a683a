"""One local Ray cluster for the whole integration tier, and one trained platform.

The session fixture ingests digits and trains both tiers with Ray Train + DeepSpeed
(a few epochs), so the training, registry and serving tests share the real artifacts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.settings import Settings, load_settings


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def store_settings(tmp_path: Path, clean_env: None) -> Settings:
    return load_settings(storage_root=tmp_path / "store")


@dataclass(frozen=True)
class Platform:
    settings: Settings
    dataset_version: str
    outcomes: dict  # tier -> TrainOutcome


@pytest.fixture(scope="session")
def platform(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Platform:
    from app.workloads import get_workload
    from data.pipeline import ingest
    from train.run import train_tier

    settings = load_settings(
        storage_root=tmp_path_factory.mktemp("platform"), train={"epochs": 6}, ray_address=None
    )
    workload = get_workload("digits")
    version = ingest(settings, workload).manifest.version
    outcomes = {tier: train_tier(settings, workload, tier) for tier in ("cheap", "expensive")}
    return Platform(settings, version, outcomes)
