"""Typed arguments of the graph: what the Serve config YAML's ``args`` hold."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.keys import ApiKey
from app.sections import BatchConfig, ServeConfig
from app.settings import Settings


class TierModelRef(BaseModel):
    """Which model version a tier serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    registered_name: str = Field(description="Registry name, e.g. digits-cheap.")
    model_ref: str = Field("champion", description="Alias or version number to load.")

    @property
    def model_id(self) -> str:
        """``name/ref``: how a caller names it to a tier replica (multiplexed id)."""
        return f"{self.registered_name}/{self.model_ref}"

    @classmethod
    def from_id(cls, model_id: str) -> TierModelRef:
        name, _, ref = model_id.rpartition("/")
        return cls(registered_name=name, model_ref=ref)


class TierConfig(BaseModel):
    """A tier's Serve ``user_config``: applied in place by ``reconfigure``, so a new
    model version (or its INT8 twin) and new batch settings need no replica restart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: TierModelRef
    batch: BatchConfig = BatchConfig()


class IngressConfig(BaseModel):
    """The ingress's ``user_config``: the cascade it routes to by default (the cheap tier
    runs it, with the threshold the ingress sends), swapped in place with the tiers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(ge=0, le=1, description="Cheap-tier confidence that suffices.")
    cheap_version: str = Field(
        description="The cheap tier's version label the threshold was calibrated for, as "
        "the tier reports it (e.g. digits-cheap/3, or its INT8 twin digits-cheap-int8/1)."
    )
    cascade_version: str = Field(description="Registry version of <workload>-cascade.")
    int8_tiers: list[str] = Field(
        [], description="Tiers served by INT8 twins: other versions routed to run so too."
    )


class GraphArgs(BaseModel):
    """Everything ``build_app`` needs; the Serve config YAML's ``args`` validate into it.

    ``serve`` is the same section as the settings' ``serve`` (limits, timeouts, CPUs per
    replica); its host and port are the proxy's and are not used here. In a generated
    config it leaves out what travels as user_config (cascade, INT8 tiers, batching,
    replicas): a change to those must not change the args, or Serve restarts replicas.
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
