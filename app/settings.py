"""Typed configuration, loaded once at the edge and passed down.

Sources, strongest first: explicit overrides (CLI flags), environment variables with the
prefix ``SCALEDL_`` (nested keys with ``__``, e.g. ``SCALEDL_TRAIN__EPOCHS=5``), a YAML
file (``--config`` or ``SCALEDL_CONFIG``), then the defaults below. Nothing here runs at
import time: call :func:`load_settings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from app.errors import ConfigError
from app.sections import CalibrateConfig, IngestConfig, OpsConfig, ServeConfig, TrainConfig

ENV_PREFIX = "SCALEDL_"
CONFIG_FILE_ENV = "SCALEDL_CONFIG"
MIN_API_KEY_LENGTH = 16


class Settings(BaseSettings):
    """Platform settings. Every field can come from YAML, ``SCALEDL_<FIELD>`` or a flag."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    storage_root: Path = Field(
        Path(".scaledl"),
        description="Where datasets, checkpoints and the default registry live. On a "
        "multi-node cluster this must be a path every node shares.",
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("SCALEDL_RAY_ADDRESS", "RAY_ADDRESS", "ray_address"),
        description="Ray cluster to join (also read from RAY_ADDRESS, which `ray job "
        "submit` sets). Unset: start a local cluster.",
    )
    ray_num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a local cluster (default: max(cores, 4)).",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI (default: sqlite under storage_root)."
    )
    api_key: SecretStr | None = Field(
        None,
        description="One extra bearer key with both scopes, for development (production "
        "keys live in the keys file). At least 16 characters, e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="Keys file (`<id> <scope> <sha256>` per line) that `scaledl keys create` "
        "writes and serving reads; default <storage_root>/api-keys.txt.",
    )
    pii_key: SecretStr | None = Field(
        None,
        description="Key of the PII pseudonyms (HMAC-SHA256), at least 16 characters. "
        "Ingesting a workload with PII columns needs it (or pii_key_file) outside --dev; "
        "keep it stable: it decides every pseudonym, so joins across versions still work.",
    )
    pii_key_file: Path | None = Field(
        None, description="A secret file holding the PII key, instead of SCALEDL_PII_KEY."
    )
    seed: int = Field(0, description="Seed for splits, initialisation and sampling.")
    dev: bool = Field(False, description="Development mode: allow generated secrets.")
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    serve: ServeConfig = ServeConfig()
    ops: OpsConfig = OpsConfig()

    @field_validator("api_key")
    @classmethod
    def _key_is_long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"an API key needs at least {MIN_API_KEY_LENGTH} characters (an empty one "
                "would not protect anything); generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
            )
        return key

    @model_validator(mode="after")
    def _shared_storage_on_clusters(self) -> Settings:
        if self.ray_address and not self.storage_root.is_absolute():
            raise ValueError(
                f"storage_root {str(self.storage_root)!r} is relative while joining the Ray "
                f"cluster at {self.ray_address}; inside `ray job submit` that is the job's "
                "temporary folder. Set SCALEDL_STORAGE_ROOT to an absolute path every node "
                "shares, e.g. --runtime-env-json "
                """'{"env_vars": {"SCALEDL_STORAGE_ROOT": "/mnt/shared/scaledl"}}'"""
            )
        return self

    @model_validator(mode="after")
    def _faults_only_in_dev(self) -> Settings:
        if self.serve.faults and not self.dev:
            raise ValueError(
                "serve.faults injects failures into served versions, for tests and "
                "development only: remove it, or set dev (SCALEDL_DEV=1 or --dev)"
            )
        return self

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI in use: the configured one, else a sqlite file in storage."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.storage_root.resolve() / 'mlflow.db'}"

    @property
    def keys_file(self) -> Path:
        return self.api_keys_file or self.storage_root.resolve() / "api-keys.txt"

    @property
    def dev_pii_key_file(self) -> Path:
        """Where --dev keeps the PII key it generates (never used outside --dev)."""
        return self.storage_root.resolve() / "dev-pii-key.txt"

    @property
    def datasets_dir(self) -> Path:
        return self.storage_root.resolve() / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.storage_root.resolve() / "runs"

    @property
    def artifacts_dir(self) -> Path:
        return self.storage_root.resolve() / "mlartifacts"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file (if any) is chosen per load_settings call; see there.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once, at an edge (CLI, job entrypoint, Serve builder).

    ``overrides`` are explicit values (CLI flags) and win over everything else; ``None``
    values are ignored so unset flags do not mask the environment or the file.
    """
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    if config_file is not None and not config_file.is_file():
        raise ConfigError(
            f"config file {config_file} does not exist: pass an existing YAML file to "
            f"--config or {CONFIG_FILE_ENV}"
        )
    # pydantic-settings reads the YAML path from model_config, which is per class, so the
    # chosen path travels on a throwaway subclass.
    cls = type(
        "Settings",
        (Settings,),
        {"model_config": {**Settings.model_config, "yaml_file": config_file}},
    )
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {config_file} is not valid YAML: {exc}") from None
    except SettingsError as exc:  # e.g. a SCALEDL_* variable that is not valid JSON
        raise ConfigError(f"invalid settings: {exc}: fix the SCALEDL_* variable") from None


def _describe(exc: ValidationError) -> str:
    """One line per broken key, naming it the way the user would set it."""
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across fields: its message names them
            lines.append(message)
            continue
        key = ".".join(str(p) for p in err["loc"])
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        lines.append(f"{key}: {message} (set it in the YAML config or {env})")
    return "invalid settings: " + "; ".join(lines)
