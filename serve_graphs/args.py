"""Typed arguments of the graph: what the Serve config YAML's ``args`` hold."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.keys import ApiKey
from app.sections import BatchConfig, Fault, OpsConfig, ServeConfig
from app.settings import Settings
from serve_graphs.decide.tier import TierModelRef


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
    max_batch_size: int = Field(
        64, ge=1, description="serve.batch.max_batch_size: most rows in one call to a tier."
    )
    cold_start_tiers: list[str] = Field(
        [], description="Tiers with min_replicas 0: ready while they have no replica."
    )
    faults: dict[str, Fault] = Field(
        {}, description="serve.faults: faults injected per cascade version (dev and tests)."
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
        [],
        description="Accepted keys besides the keys file's, hashed, with scopes (the "
        "development key, SCALEDL_API_KEY). The API is never open: these or a keys file.",
    )
    keys_file: str | None = Field(
        None,
        description="The keys file (`scaledl keys create` and `revoke` edit it), read by "
        "every ingress replica and re-read when it changes: keys change without a restart. "
        "On a cluster it must be on storage every node shares.",
    )
    serve: ServeConfig = ServeConfig()
    ops: OpsConfig = OpsConfig()

    @model_validator(mode="after")
    def _some_key(self) -> GraphArgs:
        if not self.api_keys and not self.keys_file:
            raise ValueError(
                "no API keys: give api_keys or keys_file (`scaledl keys create` writes one)"
            )
        return self

    @classmethod
    def from_settings(
        cls, settings: Settings, workload: str, keys: list[ApiKey], keys_file: str | None = None
    ) -> GraphArgs:
        return cls(
            workload=workload,
            tracking_uri=settings.tracking_uri,
            api_keys=keys,
            keys_file=keys_file,
            serve=settings.serve,
            ops=settings.ops,
        )
