"""The model artifact and the MLflow registry facade (a real sqlite registry, no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from app.errors import ModelNotFound
from app.model_artifact import ModelMeta, load_model, save_model
from app.registry import Registry
from app.workloads import get_workload

DIGITS = get_workload("digits")


def saved_model(directory: Path, tier: str = "cheap", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model(directory, DIGITS.build_model(tier), ModelMeta("digits", tier, "ds1"))


@pytest.mark.parametrize("tier", ["cheap", "expensive"])
def test_a_saved_model_loads_and_predicts_the_same(tmp_path: Path, tier: str) -> None:
    torch.manual_seed(0)
    module = DIGITS.build_model(tier).eval()
    save_model(tmp_path / "m", module, ModelMeta("digits", tier, "ds1"))
    loaded = load_model(tmp_path / "m")
    raw = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(float)
    features = DIGITS.features(pd.DataFrame(raw, columns=list(DIGITS.feature_columns)))
    with torch.inference_mode():
        expected = torch.softmax(module(torch.from_numpy(features)), 1).numpy()
    np.testing.assert_allclose(loaded.predict_proba(raw), expected, rtol=1e-6)
    assert loaded.meta.dataset_version == "ds1"


def test_a_static_int8_twin_loads_as_calibrated_and_stays_close_to_fp32(
    tmp_path: Path, digits_frame: pd.DataFrame
) -> None:
    """The twin's scales come from its calibration rows: loaded from disk it answers
    exactly as the module quantized in memory, convolutions in int8 included."""
    from train.quantize import int8_variant

    rows = digits_frame[list(DIGITS.feature_columns)]
    fp32_dir = saved_model(tmp_path / "fp32", "expensive")
    twin = int8_variant(fp32_dir, tmp_path / "int8", rows.iloc[:512])
    fp32, int8 = load_model(fp32_dir), load_model(twin.directory)
    assert int8.meta.quantization == "static-int8" and twin.speedup > 0
    kinds = {type(m).__module__ for m in int8.module.modules()}
    assert "torch.ao.nn.intrinsic.quantized.modules.conv_relu" in kinds  # conv + relu, int8
    held_out = rows.iloc[512:1024].to_numpy()
    fp32_labels = fp32.predict_proba(held_out).argmax(1)
    int8_probs = int8.predict_proba(held_out)
    assert np.mean(int8_probs.argmax(1) == fp32_labels) >= 0.95
    again = int8_variant(fp32_dir, tmp_path / "again", rows.iloc[:512])  # same rows, scales
    np.testing.assert_array_equal(load_model(again.directory).predict_proba(held_out), int8_probs)


def test_a_dynamic_int8_twin_from_before_still_loads(tmp_path: Path) -> None:
    directory = saved_model(tmp_path / "m", "expensive")
    meta = ModelMeta("digits", "expensive", "ds1", quantization="dynamic-int8")
    save_model(directory, load_model(directory).module, meta)
    loaded = load_model(directory)
    raw = np.random.default_rng(1).integers(0, 17, (4, 64)).astype(float)
    assert loaded.predict_proba(raw).shape == (4, 10)
    assert any("quantized" in type(m).__module__ for m in loaded.module.modules())


def test_loading_an_empty_folder_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="holds no model"):
        load_model(tmp_path)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")


def test_first_version_is_champion_later_ones_challengers(
    registry: Registry, tmp_path: Path
) -> None:
    run = registry.start_run("r1", params={"lr": 0.1}, tags={"tier": "cheap"})
    registry.log_metrics(run, {"train_loss": 2.0}, step=1)
    registry.log_metrics(run, {"train_loss": 0.5}, step=2)
    registry.log_metrics(run, {"test_accuracy": 0.9})
    first = registry.register(
        "digits-cheap", saved_model(tmp_path / "a"), run_id=run, tags={"dataset_version": "ds1"}
    )
    registry.finish_run(run)
    other = registry.start_run("r2", params={}, tags={})
    second = registry.register(
        "digits-cheap", saved_model(tmp_path / "b", seed=1), run_id=other, tags={}
    )
    history = registry.client.get_metric_history(run, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 0.5)]
    assert registry.resolve("digits-cheap", "champion").version == first.version == "1"
    assert registry.resolve("digits-cheap", "challenger").version == second.version == "2"
    assert registry.resolve("digits-cheap", "1").tags["dataset_version"] == "ds1"
    assert registry.run_metrics(first) == {"test_accuracy": 0.9, "train_loss": 0.5}
    assert load_model(registry.download(first)).meta.tier == "cheap"

    assert registry.promote("digits-cheap", "2") == "1"
    assert registry.resolve("digits-cheap").version == "2"
    assert registry.resolve("digits-cheap", "previous-champion").version == "1"
    listed = {ref.version: aliases for ref, aliases in registry.versions("digits-cheap")}
    assert listed == {"2": ["challenger", "champion"], "1": ["previous-champion"]}


@pytest.mark.parametrize("ref", ["champion", "7"])
def test_unknown_models_say_how_to_get_one(registry: Registry, ref: str) -> None:
    with pytest.raises(ModelNotFound, match="scaledl train --workload digits --tier expensive"):
        registry.resolve("digits-expensive", ref)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("digits-cascade", "scaledl calibrate --workload digits"),
        ("digits-cheap-int8", "--tier cheap` (it registers the INT8 twin too)"),
    ],
)
def test_missing_cascades_and_int8_twins_name_the_command_that_makes_them(
    registry: Registry, name: str, hint: str
) -> None:
    with pytest.raises(ModelNotFound, match=re.escape(hint)):
        registry.resolve(name)


def test_calibrating_tiers_trained_on_different_data_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    from app.errors import ConfigError
    from app.settings import load_settings
    from train.calibrate import calibrate

    run = registry.start_run("r", params={}, tags={})
    for tier, dataset in (("cheap", "ds1"), ("expensive", "ds2")):
        registry.register(
            f"digits-{tier}",
            saved_model(tmp_path / tier, tier),
            run_id=run,
            artifact_path=tier,
            tags={"dataset_version": dataset},
        )
    settings = load_settings(
        storage_root=tmp_path / "store", mlflow_tracking_uri=registry.tracking_uri
    )
    with pytest.raises(ConfigError, match="dataset version ds1 .* on ds2: calibrate a pair"):
        calibrate(settings, DIGITS, cheap="1", expensive="1")
