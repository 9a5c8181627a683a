"""Ray Train + DeepSpeed on a dataset version, into the MLflow registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import ConfigError
from app.model_artifact import load_model
from app.registry import Registry
from app.settings import load_settings
from app.workloads import get_workload
from tests.integration.conftest import Platform
from train.run import check_cluster_fits, train_tier


@pytest.mark.parametrize(("tier", "floor"), [("cheap", 0.9), ("expensive", 0.95)])
def test_each_tier_trains_to_a_real_accuracy_and_is_registered(
    platform: Platform, tier: str, floor: float
) -> None:
    outcome = platform.outcomes[tier]
    assert outcome.metrics["test_accuracy"] >= floor
    assert outcome.metrics["epochs"] == 6
    registry = Registry(platform.settings.tracking_uri)
    ref = registry.resolve(f"digits-{tier}", outcome.model.version)
    assert ref.tags["dataset_version"] == platform.dataset_version
    assert ref.tags["tier"] == tier
    assert registry.run_metrics(ref)["test_accuracy"] == pytest.approx(
        outcome.metrics["test_accuracy"]
    )
    model = load_model(registry.download(ref))
    assert (model.meta.tier, model.meta.dataset_version) == (tier, platform.dataset_version)


def test_checkpoints_hold_every_ranks_deepspeed_state_and_the_weights(platform: Platform) -> None:
    run = Path(platform.settings.runs_dir) / platform.outcomes["cheap"].run_name
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == platform.settings.train.checkpoints_to_keep
    latest = checkpoints[-1]
    assert (latest / "model" / "weights.pt").is_file()
    optimizer_shards = list(latest.rglob("*optim_states.pt"))
    assert len(optimizer_shards) == platform.settings.train.num_workers  # ZeRO-1: one per rank


def test_a_layout_the_cluster_cannot_place_is_refused_before_training(platform: Platform) -> None:
    settings = load_settings(storage_root=platform.settings.storage_root, train={"num_workers": 8})
    with pytest.raises(ConfigError, match=r"training needs 9 CPUs .* cluster has 4"):
        check_cluster_fits(settings.train)
    with pytest.raises(ConfigError):
        train_tier(settings, get_workload("digits"), "cheap")
