from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import load_settings


def test_defaults_are_the_embedded_platform(clean_env: None) -> None:
    s = load_settings()
    assert s.storage_root == Path(".scaledl")
    assert s.ray_address is None
    assert s.tracking_uri == f"sqlite:///{Path('.scaledl').resolve() / 'mlflow.db'}"
    assert s.serve.port == 8000


def test_env_overrides_yaml_and_flags_override_env(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "scaledl.yaml"
    cfg.write_text("seed: 7\ntrain:\n  epochs: 3\n  lr: 0.5\nserve:\n  port: 9001\n")
    monkeypatch.setenv("SCALEDL_TRAIN__EPOCHS", "5")
    monkeypatch.setenv("SCALEDL_CONFIG", str(cfg))
    s = load_settings(serve={"port": 9100})
    assert s.seed == 7  # from the file
    assert s.train.epochs == 5  # env beats the file
    assert s.train.lr == 0.5  # the rest of the file's section survives the env override
    assert s.serve.port == 9100  # a flag beats everything


def test_bad_value_names_the_key_and_its_env_var(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCALEDL_TRAIN__NUM_WORKERS", "0")
    with pytest.raises(ConfigError, match=r"train\.num_workers: .* SCALEDL_TRAIN__NUM_WORKERS"):
        load_settings()


def test_unknown_key_in_yaml_is_refused(clean_env: None, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_settings(cfg)


def test_missing_config_file_says_so(clean_env: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_split_fractions_must_sum_to_one(clean_env: None) -> None:
    with pytest.raises(ConfigError, match="split_fractions"):
        load_settings(ingest={"split_fractions": [0.5, 0.2, 0.2]})


def test_joining_a_cluster_needs_an_absolute_storage_root(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it
    with pytest.raises(ConfigError, match="SCALEDL_STORAGE_ROOT"):
        load_settings()
    assert load_settings(storage_root="/shared/scaledl").ray_address == "10.0.0.1:6379"
