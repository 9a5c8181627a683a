"""Deploying the Serve application from settings (what `scaledl serve` and the demo do)."""

from __future__ import annotations

import secrets
import signal
import threading
from dataclasses import dataclass

from app.errors import ConfigError
from app.registry import Registry
from app.settings import Settings
from app.workloads import TIERS, get_workload


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    predict_url: str


def resolve_api_key(settings: Settings, *, dev: bool) -> str:
    """The configured key; in development a fresh random one; otherwise a refusal."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if dev or settings.dev:
        return secrets.token_urlsafe(24)
    raise ConfigError(
        "no API key: set SCALEDL_API_KEY (or api_key in the config file), or pass --dev to "
        "generate one for development"
    )


def check_models(settings: Settings, workload_name: str, model_ref: str) -> None:
    """Both tiers resolve in the registry, or ModelNotFound says how to get them."""
    workload = get_workload(workload_name)
    registry = Registry(settings.tracking_uri)
    for tier in TIERS:
        registry.resolve(workload.registered_model_name(tier), model_ref)


def deploy(
    settings: Settings, workload_name: str, api_key: str | None, *, model_ref: str
) -> Endpoint:
    """Run the graph for ``workload_name`` on the connected Ray cluster."""
    from ray import serve

    from serve_graphs.api import key_sha256
    from serve_graphs.args import GraphArgs
    from serve_graphs.builder import build_app

    workload = get_workload(workload_name)
    check_models(settings, workload_name, model_ref)  # fail here, not in a replica
    args = GraphArgs.from_settings(
        settings, workload.name, key_sha256(api_key) if api_key else None, model_ref=model_ref
    )
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(build_app(args), name=workload.name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if settings.serve.host in ("0.0.0.0", "::") else settings.serve.host
    base = f"http://{host}:{settings.serve.port}"
    return Endpoint(base, f"{base}/v1/models/{workload.name}/predict")


def serve_until_interrupted() -> None:
    """Block until Ctrl-C or SIGTERM (how Kubernetes and `kill` stop a process)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
