"""Deploying the Serve application from settings (what `scaledl serve` and the demo do)."""

from __future__ import annotations

import secrets
import signal
import threading
import time
from dataclasses import dataclass

from app.cascade_spec import load_cascade
from app.errors import ConfigError, ServiceUnavailable
from app.keys import ApiKey, dev_key, read_keys_file
from app.registry import Registry
from app.settings import Settings
from app.workloads import get_workload


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    predict_url: str


@dataclass(frozen=True)
class Access:
    """The keys the service accepts, and a secret this process may call it with."""

    keys: list[ApiKey]
    client_key: str | None  # SCALEDL_API_KEY or a generated one; None with a keys file only
    generated: bool  # client_key was made here (development): print it, it is nowhere else


def resolve_access(settings: Settings, *, dev: bool, need_client_key: bool = False) -> Access:
    """The keys file and SCALEDL_API_KEY; with neither, a generated key in development
    and a refusal otherwise. ``need_client_key`` (the demo) adds a generated key when
    no secret is at hand."""
    keys: list[ApiKey] = []
    if settings.keys_file.is_file() or settings.api_keys_file is not None:
        keys += read_keys_file(settings.keys_file)
    client = None
    if settings.api_key is not None:
        client = settings.api_key.get_secret_value()
        keys.append(dev_key(client, "env"))
    if keys and (client or not need_client_key):
        return Access(keys, client, generated=False)
    if not (dev or settings.dev):
        raise ConfigError(
            "no API keys: create one with `scaledl keys create --scope predict` (stored in "
            f"{settings.keys_file}, or SCALEDL_API_KEYS_FILE), or set SCALEDL_API_KEY, or "
            "pass --dev to generate one for development"
        )
    generated = secrets.token_urlsafe(24)
    return Access([*keys, dev_key(generated)], generated, generated=True)


def check_models(settings: Settings, workload_name: str) -> None:
    """The cascade to serve and both its tiers resolve, or ModelNotFound says how."""
    workload = get_workload(workload_name)
    registry = Registry(settings.tracking_uri)
    spec, _ = load_cascade(registry, workload.name, settings.serve.cascade_ref)
    registry.resolve(workload.registered_model_name("cheap"), spec.cheap_version)
    registry.resolve(workload.registered_model_name("expensive"), spec.expensive_version)


def deploy(
    settings: Settings, workload_name: str, keys: list[ApiKey], *, timeout_s: float = 300
) -> Endpoint:
    """Deploy the graph for ``workload_name`` on the connected Ray cluster, as
    `serve deploy` would deploy the config `scaledl serve config` prints.

    Declaratively, not with ``serve.run``: Serve then compares the new config with the
    running one, and when only user_configs differ (a new cascade, an INT8 twin, batch
    settings) it reconfigures the running replicas in place instead of replacing them.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from app.serve_config import serve_config

    workload = get_workload(workload_name)
    check_models(settings, workload_name)  # fail here, not in a replica
    config = serve_config(settings, workload.name, keys)
    serve.start(http_options=config["http_options"])
    before = serve.status().applications.get(workload.name)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    wait_until_running(
        workload.name,
        after=before.last_deployed_time_s if before else None,
        timeout_s=timeout_s,
    )
    base = settings.serve.base_url
    return Endpoint(base, f"{base}/v1/models/{workload.name}/predict")


def wait_until_running(app_name: str, *, after: float | None, timeout_s: float) -> None:
    """Until the application deployed later than ``after`` (the deploy time the
    controller reported before, so one clock decides) runs, or why it does not."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        fresh = app is not None and (after is None or app.last_deployed_time_s > after)
        if fresh and app.status == "RUNNING":
            return
        if fresh and app.status == "DEPLOY_FAILED":
            raise ServiceUnavailable(f"the {app_name} application failed to deploy: {app.message}")
        if time.monotonic() > deadline:
            state = f"{app.status}: {app.message}" if app else "not created"
            raise ServiceUnavailable(
                f"the {app_name} application is not running after {timeout_s:g} s ({state}); "
                "see the Serve logs in the Ray dashboard"
            )
        time.sleep(0.5)


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
