"""What the rollout controller (actors/rollout_actor.py) acts through, for one workload:
the routing table in the registry, the promotion (the champion alias, then the graph's
user_configs redeployed in place), and where its state is kept.

These are the controller's ports (actors/rollout.py). They live here, not in actors/,
because they are the serving graph's own: the same table validation as ``PUT /routes``
(``decide.routing.build_table``), the same resolution of cascade versions (catalog.py),
the same user_configs as a deploy (builder.py). The ingress hands them to the actor when
it creates it; they hold only a tracking URI, so they pickle across the Ray boundary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.cascade_spec import cascade_name, load_cascade, promote_cascade
from app.errors import (
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    find_scaledl_error,
)
from app.registry import Registry
from app.workloads import get_workload
from serve_graphs.catalog import RegistryRouteStore
from serve_graphs.decide.routing import RouteSpec, build_table, error_text, version_of

log = logging.getLogger("ray.serve")

ROLLOUT_TAG = "scaledl.rollout"  # a rollout's state, a tag of <workload>-cascade
CONTROLLER = "rollout-controller"  # who the routing table says set it


class _Registered:
    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.tracking_uri)
        return self._registry

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "_registry": None}


class RegistryRoutes(_Registered):
    """The routing table a rollout writes: validated and resolved as ``PUT /routes``
    does, stored where every ingress replica reads it (within serve.routes_poll_s)."""

    def get(self, model: str) -> str | None:
        return RegistryRouteStore(self.registry, model).load()

    def set(self, model: str, weights: dict[str, int], shadow: str | None) -> str:
        try:
            spec = RouteSpec(routes={str(v): w for v, w in weights.items()}, shadow=shadow)
        except ValueError as exc:
            raise InvalidRequest(f"invalid routing table: {error_text(exc)}") from None
        versions = {}
        for ref in [*spec.routes, *([spec.shadow] if spec.shadow else [])]:
            try:
                versions[ref] = load_cascade(self.registry, model, ref)[1].version
            except NotFound as exc:
                raise InvalidRequest(f"version {ref}: {exc.message}") from None
        text = build_table(spec, versions, CONTROLLER).model_dump_json()
        RegistryRouteStore(self.registry, model).save(text)
        return text

    def clear(self, model: str) -> None:
        RegistryRouteStore(self.registry, model).save(None)


class RegistryRolloutState(_Registered):
    """A rollout's state as a tag of the cascade's registered model: it outlives the
    controller, and every node reads the same registry."""

    def load(self, model: str) -> str | None:
        return self.registry.model_tag(cascade_name(model), ROLLOUT_TAG)

    def save(self, model: str, text: str) -> None:
        self.registry.set_model_tag(cascade_name(model), ROLLOUT_TAG, text)


class ServePromoter(_Registered):
    """Promotion: the cascade's champion alias (and its tiers') moves to the challenger,
    then the running application is redeployed with the challenger's user_configs, which
    Serve applies in place (``reconfigure``): no replica restarts, no request fails."""

    def promote(self, model: str, version: str) -> None:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        from serve_graphs.builder import promoted_user_configs

        spec, ref = load_cascade(self.registry, model, version)
        promote_cascade(self.registry, spec, ref)
        client = _get_global_client()
        details = client.get_serve_details()
        apps = []
        for name, app in details["applications"].items():
            config = dict(app["deployed_app_config"])
            if name == model:
                configs = {d["name"]: d.get("user_config") for d in config["deployments"]}
                new = promoted_user_configs(self.registry, get_workload(model), version, configs)
                config["deployments"] = [
                    {**d, "user_config": new.get(d["name"], d.get("user_config"))}
                    for d in config["deployments"]
                ]
            apps.append(config)
        schema = {
            "proxy_location": details.get("proxy_location", "EveryNode"),
            "http_options": details.get("http_options", {}),
            "applications": apps,
        }
        client.deploy_apps(ServeDeploySchema.model_validate(schema))
        log.info("promoted %s cascade v%s: redeployed in place", model, version)


class ActorRollouts:
    """The rollout routes' port (``api.rollouts.RolloutsPort``) over the controller actor,
    created on first use with this workload's ports. Aliases are resolved here, so the
    rollout names versions, and the controller's errors come back as they were raised."""

    def __init__(self, tracking_uri: str, workload: str) -> None:
        self.tracking_uri, self.workload = tracking_uri, workload
        self.registry = Registry(tracking_uri)
        self._actor: Any = None

    def _handle(self) -> Any:
        """The actor, looked up (or created) once: Ray restarts it behind the same handle.
        A blocking call to the GCS: :meth:`_call` makes it on a thread, off the loop."""
        from actors.rollout_actor import rollout_controller

        if self._actor is None:
            uri = self.tracking_uri
            self._actor = rollout_controller(
                RegistryRoutes(uri), ServePromoter(uri), RegistryRolloutState(uri), [self.workload]
            )
        return self._actor

    def _version(self, ref: object, flag: str) -> object:
        text = str(ref).strip()
        if version_of(text) is not None:
            return text  # a version: the table checks it exists when it is written
        try:
            return load_cascade(self.registry, self.workload, text)[1].version
        except NotFound as exc:
            raise InvalidRequest(f"{flag}: {exc.message}") from None

    async def _call(self, method: str, *args: object) -> dict[str, Any]:
        try:
            handle = self._actor or await asyncio.to_thread(self._handle)  # looked up once
            return await getattr(handle, method).remote(*args)
        except Exception as exc:
            ours = find_scaledl_error(exc)
            if ours is not None:
                raise ours from None
            self._actor = None  # gone for good (killed without restart): look it up again
            log.exception("the rollout controller failed on %s", method)
            raise ServiceUnavailable(
                f"the rollout controller could not be reached ({type(exc).__name__}): retry shortly"
            ) from None

    async def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        for field, flag in (("challenger", "--challenger"), ("champion", "--champion")):
            if spec.get(field) is not None:
                spec = {**spec, field: await asyncio.to_thread(self._version, spec[field], flag)}
        return await self._call("start", spec)

    async def status(self, model: str) -> dict[str, Any]:
        return await self._call("status", model)

    async def pause(self, model: str) -> dict[str, Any]:
        return await self._call("pause", model)

    async def resume(self, model: str) -> dict[str, Any]:
        return await self._call("resume", model)

    async def abort(self, model: str) -> dict[str, Any]:
        return await self._call("abort", model)
