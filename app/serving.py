"""Deploying the Serve application from settings (what `scaledl serve` and the demo do)."""

from __future__ import annotations

import secrets
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
    """The keys the service accepts, and a secret this process may call it with.

    The keys file's keys are not copied into the deployment: its replicas read the file
    (``keys_file``) and re-read it when it changes. Only ``static_keys`` travel in the
    application's args."""

    static_keys: list[ApiKey]  # SCALEDL_API_KEY's, a generated one: these travel in the args
    keys_file: str | None  # the keys file (absolute), when one is used
    file_keys: list[ApiKey]  # what it holds now
    client_key: str | None  # SCALEDL_API_KEY or a generated one; None with a keys file only
    generated: bool  # client_key was made here (development): print it, it is nowhere else

    @property
    def keys(self) -> list[ApiKey]:
        """Every key accepted now: the file's, then the static ones."""
        return [*self.file_keys, *self.static_keys]


def resolve_access(settings: Settings, *, dev: bool, need_client_key: bool = False) -> Access:
    """The keys file and SCALEDL_API_KEY; with neither, a generated key in development
    and a refusal otherwise. ``need_client_key`` (the demo) adds a generated key when
    no secret is at hand. The keys file is read here too, so a broken one fails now."""
    keys_file = None
    file_keys: list[ApiKey] = []
    if settings.keys_file.is_file() or settings.api_keys_file is not None:
        file_keys = read_keys_file(settings.keys_file)
        # Absolute: the replicas that read it do not run in this folder.
        keys_file = str(settings.keys_file.resolve())
    static: list[ApiKey] = []
    client = None
    if settings.api_key is not None:
        client = settings.api_key.get_secret_value()
        static.append(dev_key(client, "env"))
    if (file_keys or static) and (client or not need_client_key):
        return Access(static, keys_file, file_keys, client, generated=False)
    if not (dev or settings.dev):
        raise ConfigError(
            "no API keys: create one with `scaledl keys create --scope predict` (stored in "
            f"{settings.keys_file}, or SCALEDL_API_KEYS_FILE), or set SCALEDL_API_KEY, or "
            "pass --dev to generate one for development"
        )
    generated = secrets.token_urlsafe(24)
    return Access([*static, dev_key(generated)], keys_file, file_keys, generated, generated=True)


def check_models(settings: Settings, workload_name: str) -> None:
    """The cascade to serve and both its tiers resolve, or ModelNotFound says how."""
    workload = get_workload(workload_name)
    registry = Registry(settings.tracking_uri)
    spec, _ = load_cascade(registry, workload.name, settings.serve.cascade_ref)
    registry.resolve(workload.registered_model_name("cheap"), spec.cheap_version)
    registry.resolve(workload.registered_model_name("expensive"), spec.expensive_version)


def deploy(
    settings: Settings,
    workload_name: str,
    keys: list[ApiKey],
    *,
    keys_file: str | None = None,
    timeout_s: float = 300,
) -> Endpoint:
    """Deploy the graph for ``workload_name`` on the connected Ray cluster, as
    `serve deploy` would deploy the config `scaledl serve config` prints.

    ``keys`` are the keys not in ``keys_file`` (``Access.static_keys``); the replicas
    read the file themselves and re-read it when it changes.

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
    config = serve_config(settings, workload.name, keys, keys_file=keys_file)
    serve.start(http_options=config["http_options"])
    before = serve.status().applications.get(workload.name)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + timeout_s
    wait_until_running(
        workload.name,
        after=before.last_deployed_time_s if before else None,
        timeout_s=timeout_s,
    )
    base = settings.serve.base_url
    wait_until_ready(base, timeout_s=max(1.0, deadline - time.monotonic()))
    return Endpoint(base, f"{base}/v1/models/{workload.name}/predict")


def wait_until_ready(base_url: str, *, timeout_s: float) -> None:
    """Until ``/v2/health/ready`` answers 200: each tier the served versions need runs a
    replica with its model loaded (or may cold-start one). Serve calls the application
    RUNNING a moment before its proxy routes to it, and before the ingress has read how
    many tier replicas run; the readiness route is what says the service can answer."""
    import httpx

    deadline = time.monotonic() + timeout_s
    why = "no answer yet"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{base_url}/v2/health/ready", timeout=5)
            if resp.status_code == 200:
                return
            why = _reason(resp)
        except httpx.HTTPError as exc:  # the proxy is not listening yet
            why = type(exc).__name__
        time.sleep(0.25)
    raise ServiceUnavailable(
        f"the service at {base_url} is not ready after {timeout_s:g} s ({why}); see the "
        "Serve logs in the Ray dashboard"
    )


def _reason(resp: object) -> str:
    try:
        return str(resp.json().get("error", resp.status_code))  # type: ignore[attr-defined]
    except ValueError:
        return f"HTTP {resp.status_code}"  # type: ignore[attr-defined]


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
    """Block until Ctrl-C, or SIGTERM (how systemd, Kubernetes and `kill` stop a
    process), which app.runtime.ray_session turns into the same KeyboardInterrupt."""
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
