"""Deploying the Serve application from settings (what `scaledl serve` and the demo do)."""

from __future__ import annotations

from dataclasses import dataclass

from app.registry import Registry
from app.settings import Settings
from app.workloads import TIERS, get_workload


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    predict_url: str


def check_models(settings: Settings, workload_name: str, model_ref: str) -> None:
    """Both tiers resolve in the registry, or ModelNotFound says how to get them."""
    workload = get_workload(workload_name)
    registry = Registry(settings.tracking_uri)
    for tier in TIERS:
        registry.resolve(workload.registered_model_name(tier), model_ref)


def deploy(settings: Settings, workload_name: str, api_key: str | None, *, model_ref: str) -> Endpoint:
    """Run the graph for ``workload_name`` on the connected Ray cluster."""
    from ray import serve

    from serve_graphs.api import key_sha256
    from serve_graphs.builder import GraphArgs, build_app

    workload = get_workload(workload_name)
    check_models(settings, workload_name, model_ref)  # fail here, not in a replica
    args = GraphArgs.from_settings(
        settings, workload.name, key_sha256(api_key) if api_key else None
    ).model_copy(update={"model_ref": model_ref})
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(build_app(args), name=workload.name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if settings.serve.host in ("0.0.0.0", "::") else settings.serve.host
    base = f"http://{host}:{settings.serve.port}"
    return Endpoint(base, f"{base}/v1/models/{workload.name}/predict")
