"""The graph builder: ``build_app(GraphArgs) -> Application``.

The Serve config YAML (``import_path: serve_graphs.builder:build_app`` plus ``args``) is
the only deploy-time input; ``scaledl serve`` builds the same args from the settings.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from app.settings import Settings
from app.workloads import get_workload
from serve_graphs.ingress import Ingress
from serve_graphs.tier_model import TierArgs, TierBatchConfig, TierModel


class GraphArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str = Field(description="Workload to serve, e.g. digits.")
    tracking_uri: str = Field(description="MLflow registry URI the tiers load from.")
    model_ref: str = Field("champion", description="Alias or version both tiers load.")
    cascade_threshold: float = Field(0.9, ge=0, le=1)
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
    def from_settings(cls, settings: Settings, workload: str, api_key_sha256: str | None) -> GraphArgs:
        s = settings.serve
        return cls(
            workload=workload,
            tracking_uri=settings.tracking_uri,
            cascade_threshold=s.cascade_threshold,
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


def build_app(args: GraphArgs) -> Application:
    workload = get_workload(args.workload)
    tiers = {
        tier: TierModel.options(
            name=f"{workload.name}-{tier}",
            ray_actor_options={"num_cpus": args.tier_num_cpus},
            max_ongoing_requests=args.tier_max_ongoing_requests,
            user_config=args.batch.model_dump(),
        ).bind(
            TierArgs(
                registered_name=workload.registered_model_name(tier),
                model_ref=args.model_ref,
                tracking_uri=args.tracking_uri,
            ).model_dump()
        )
        for tier in ("cheap", "expensive")
    }
    return Ingress.options(
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=args.ingress_max_ongoing_requests,
    ).bind(
        tiers["cheap"], tiers["expensive"], args.model_dump()
    )
