"""Security audit of every route, enumerated from the app itself: a route added later is
audited too. Every route but liveness, readiness and the docs needs a key; every route
that is not an inference route needs an admin key; the routes without a key do not say
which versions serve. The app is the one the ingress deployment builds (build_api), with
the rollout routes mounted."""

from __future__ import annotations

import asyncio
import re

import pytest
from fastapi.routing import iter_route_contexts

from app.keys import KeyRing, dev_key
from serve_graphs.api.app import build_api
from serve_graphs.decide.readiness import Readiness
from serve_graphs.decide.routing import RouteSpec
from tests.unit.test_api import DIGITS, KEY
from tests.unit.test_rollout import World
from tests.unit.test_rollout_routes import LocalRollouts
from tests.unit.test_routing import Registry, routing_for

PREDICT_KEY = "only-predicts-0123456789"
WRONG = {"Authorization": "Bearer not-a-key-of-this-service"}

OPEN = {  # no key: what probes and load balancers call
    ("GET", "/healthz"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{model}/ready"),
}
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
INFERENCE = {  # a predict-scope key suffices; every other keyed route is admin
    ("POST", "/v1/models/{name}/predict"),
    ("POST", "/v1/models/{name}/versions/{version}/predict"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{model}"),
    ("GET", "/v2/models/{model}/versions/{version}"),
    ("GET", "/v2/models/{model}/versions/{version}/ready"),
    ("POST", "/v2/models/{model}/infer"),
    ("POST", "/v2/models/{model}/versions/{version}/infer"),
}


def service():  # noqa: ANN201 - (TestClient, [(method, path template)])
    from fastapi.testclient import TestClient

    keys = KeyRing(
        [dev_key(KEY), dev_key(PREDICT_KEY, "p").model_copy(update={"scope": "predict"})]
    )
    routing = routing_for(Registry())  # deployed 3; the table routes 4 too
    asyncio.run(routing.set(RouteSpec(routes={"3": 90, "4": 10}), by="audit"))
    readiness = Readiness({"cheap": 1, "expensive": 1})
    readiness.loaded("4", "OSError: /secret/path/to/model-4")  # the routed version broke
    rollouts = LocalRollouts(World().controller())
    api = build_api(
        DIGITS, routing, keys=keys, max_instances=8, readiness=readiness, rollouts=rollouts
    )
    routes = []
    # Every route as FastAPI matches it, included routers flattened (as FastAPI 0.165
    # keeps them: api.routes holds an included router as one entry).
    for route in iter_route_contexts(api.routes):
        if route.path in DOCS:
            continue
        assert route.methods, route.path  # a mount or websocket would need its own audit
        routes += [(m, route.path) for m in sorted(route.methods) if m != "HEAD"]
    return TestClient(api), routes


def concrete(path: str) -> str:
    return path.format(name="digits", model="digits", version="3")


_, ROUTES = service()
KEYED = sorted(set(ROUTES) - OPEN)


@pytest.fixture
def client():  # noqa: ANN201 - a fresh service each: the admin calls change its routing
    return service()[0]


def test_the_audit_sees_every_kind_of_route() -> None:
    assert OPEN <= set(ROUTES) and INFERENCE <= set(ROUTES)
    admin = set(KEYED) - INFERENCE
    assert {p for _, p in admin} >= {"/v1/models/{name}/routes", "/v1/models/{name}/rollout"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), KEYED)
def test_every_keyed_route_refuses_a_missing_or_wrong_key(client, method: str, path: str) -> None:
    for headers in ({}, WRONG, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        resp = client.request(method, concrete(path), headers=headers, json={})
        assert resp.status_code == 401, (method, path, headers, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer" and "error" in resp.json()
    scope_ok = client.request(method, concrete(path), headers=bearer(KEY), json={})
    assert scope_ok.status_code not in (401, 403), (method, path, scope_ok.text)


@pytest.mark.parametrize(("method", "path"), sorted(set(KEYED) - INFERENCE))
def test_every_admin_route_refuses_a_predict_key(client, method: str, path: str) -> None:
    resp = client.request(method, concrete(path), headers=bearer(PREDICT_KEY), json={})
    assert resp.status_code == 403, (method, path, resp.text)


@pytest.mark.parametrize(("method", "path"), sorted(OPEN))
def test_routes_without_a_key_do_not_say_which_versions_serve(
    client, method: str, path: str
) -> None:
    resp = client.request(method, concrete(path))
    assert resp.status_code in (200, 503), resp.text
    if path.endswith("ready"):  # not ready: version 4 failed to load
        assert resp.status_code == 503 and "routed version" in resp.json()["error"]
    text = resp.text + "".join(f"{k}:{v}" for k, v in resp.headers.items())
    assert not {"3", "4"} & set(re.findall(r"\d+", text)), text
    assert "secret" not in text and "OSError" not in text
    # A key holder is told which version and why.
    if path == "/v2/models/{model}/ready":
        keyed = client.get(concrete("/v2/models/{model}/versions/4/ready"), headers=bearer(KEY))
        assert keyed.status_code == 503 and "version 4" in keyed.json()["error"]
