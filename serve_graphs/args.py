"""Typed arguments of the graph: what the Serve config YAML's ``args`` hold."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.settings import Settings


class TierArgs(BaseModel):
    """Which model version a tier serves, and from which registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    registered_name: str = Field(description="Registry name, e.g. digits-cheap.")
    model_ref: str = Field("champion", description="Alias or version number to load.")
    tracking_uri: str = Field(description="MLflow registry URI.")


class TierBatchConfig(BaseModel):
    """The ``user_config`` of a tier: applied in place by ``reconfigure``."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(64, ge=1, description="Most rows of requests run as one batch.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=0.05, description="Longest wait for a batch to fill (<= 50 ms)."
    )


class GraphArgs(BaseModel):
    """Everything ``build_app`` needs; the Serve config YAML's ``args`` validate into it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str = Field(description="Workload to serve, e.g. digits.")
    tracking_uri: str = Field(description="MLflow registry URI the tiers load from.")
    cascade_ref: str = Field(
        "champion",
        description="Calibrated cascade (alias or version of <workload>-cascade): it names "
        "both tier versions and the threshold.",
    )
    api_key_sha256: str | None = Field(
        None, description="SHA-256 of the bearer key; None leaves the API open (dev only)."
    )
    max_instances_per_request: int = Field(1024, ge=1)
    batch: TierBatchConfig = TierBatchConfig()
    tier_num_cpus: float = Field(0.5, gt=0)
    ingress_num_cpus: float = Field(0.25, ge=0)
    tier_max_ongoing_requests: int = Field(128, ge=1)
    ingress_max_ongoing_requests: int = Field(64, ge=1)

    @classmethod
    def from_settings(
        cls, settings: Settings, workload: str, api_key_sha256: str | None
    ) -> GraphArgs:
        s = settings.serve
        return cls(
            workload=workload,
            tracking_uri=settings.tracking_uri,
            cascade_ref=s.cascade_ref,
            api_key_sha256=api_key_sha256,
            max_instances_per_request=s.max_instances_per_request,
            batch=TierBatchConfig(
                max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s
            ),
            tier_num_cpus=s.tier_num_cpus,
            ingress_num_cpus=s.ingress_num_cpus,
            tier_max_ongoing_requests=s.tier_max_ongoing_requests,
            ingress_max_ongoing_requests=s.ingress_max_ongoing_requests,
        )
