"""Typed arguments of the graph: what the Serve config YAML's ``args`` hold."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.keys import ApiKey
from app.settings import ServeConfig, Settings


class TierArgs(BaseModel):
    """Which model version a tier serves, and from which registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    registered_name: str = Field(description="Registry name, e.g. digits-cheap.")
    model_ref: str = Field("champion", description="Alias or version number to load.")
    tracking_uri: str = Field(description="MLflow registry URI.")


class GraphArgs(BaseModel):
    """Everything ``build_app`` needs; the Serve config YAML's ``args`` validate into it.

    ``serve`` is the same section as the settings' ``serve`` (cascade, batching, limits,
    CPUs per replica); its host and port are the proxy's and are not used here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str = Field(description="Workload to serve, e.g. digits.")
    tracking_uri: str = Field(description="MLflow registry URI the tiers load from.")
    api_keys: list[ApiKey] = Field(
        min_length=1,
        description="Accepted keys, hashed, with scopes (`scaledl keys create` writes them; "
        "copy the keys file's lines here). The API is never open.",
    )
    serve: ServeConfig = ServeConfig()

    @classmethod
    def from_settings(cls, settings: Settings, workload: str, keys: list[ApiKey]) -> GraphArgs:
        return cls(
            workload=workload,
            tracking_uri=settings.tracking_uri,
            api_keys=keys,
            serve=settings.serve,
        )
