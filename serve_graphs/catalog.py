"""What the registry says serving runs: the tier models of a cascade version, and the
stored routing table.

Both the builder (the deployed cascade, pinned in user_config) and the ingress (the
other versions a routing table names) resolve cascade versions here, so an A/B
challenger runs exactly as it would run deployed, INT8 twins included.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.cascade_spec import CascadeSpec, cascade_name, load_cascade
from app.registry import ModelRef, Registry
from app.workloads import TIERS, Workload
from serve_graphs.args import TierModelRef

ROUTES_TAG = "scaledl.routes"  # the routing table, a tag of <workload>-cascade


@dataclass(frozen=True)
class CascadeModels:
    spec: CascadeSpec
    ref: ModelRef  # the cascade version itself
    tiers: dict[str, TierModelRef]  # tier -> the model version (or INT8 twin) it runs


def cascade_models(
    registry: Registry, workload: Workload, ref: str, int8_tiers: list[str]
) -> CascadeModels:
    """The cascade ``ref`` (alias or version) and the model each tier runs for it."""
    spec, version = load_cascade(registry, workload.name, ref)
    versions = {"cheap": spec.cheap_version, "expensive": spec.expensive_version}
    tiers = {
        tier: tier_model(
            registry,
            workload.registered_model_name(tier),
            versions[tier],
            int8=tier in int8_tiers,
        )
        for tier in TIERS
    }
    return CascadeModels(spec, version, tiers)


def tier_model(registry: Registry, name: str, version: str, *, int8: bool) -> TierModelRef:
    """A tier's pinned version, or the INT8 twin registered with it."""
    if not int8:
        return TierModelRef(registered_name=name, model_ref=version)
    twin = registry.int8_twin(name, version)
    return TierModelRef(registered_name=twin.name, model_ref=twin.version)


class RegistryRouteStore:
    """The routing table as a tag of ``<workload>-cascade``: it outlives replicas and
    redeploys, and every ingress replica reads the same one."""

    def __init__(self, registry: Registry, workload: str) -> None:
        self.registry = registry
        self.name = cascade_name(workload)

    def load(self) -> str | None:
        return self.registry.model_tag(self.name, ROUTES_TAG)

    def save(self, text: str | None) -> None:
        self.registry.set_model_tag(self.name, ROUTES_TAG, text)
