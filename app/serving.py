"""Deploying the Serve application from settings (what `scaledl serve` and the demo do)."""

from __future__ import annotations

import secrets
import signal
import threading
from dataclasses import dataclass

from app.cascade_spec import load_cascade
from app.errors import ConfigError
from app.registry import Registry
from app.settings import Settings
from app.workloads import get_workload


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


def check_models(settings: Settings, workload_name: str) -> None:
    """The cascade to serve and both its tiers resolve, or ModelNotFound says how."""
    workload = get_workload(workload_name)
    registry = Registry(settings.tracking_uri)
    spec, _ = load_cascade(registry, workload.name, settings.serve.cascade_ref)
    registry.resolve(workload.registered_model_name("cheap"), spec.cheap_version)
    registry.resolve(workload.registered_model_name("expensive"), spec.expensive_version)


def deploy(settings: Settings, workload_name: str, api_key: str | None) -> Endpoint:
    """Run the graph for ``workload_name`` on the connected Ray cluster."""
    from ray import serve

    from serve_graphs.api import key_sha256
    from serve_graphs.args import GraphArgs
    from serve_graphs.builder import build_app

    workload = get_workload(workload_name)
    check_models(settings, workload_name)  # fail here, not in a replica
    args = GraphArgs.from_settings(
        settings, workload.name, key_sha256(api_key) if api_key else None
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
