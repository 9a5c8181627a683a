"""A/B, canary and shadow routing over cascade versions, through the HTTP API (no Ray).

Each cascade version here is a pair of stand-in tiers that always answer one label, so
the label tells which version answered; the registry is an in-memory route store and a
resolver over three versions. The real tiers and registry are in the integration test.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections import Counter

import numpy as np
import pytest

from app.errors import NotFound, ServiceUnavailable
from app.keys import KeyRing, dev_key
from serve_graphs.api.app import build_api
from serve_graphs.api.observe import LiveStats
from serve_graphs.decide.cascade import RoutedCascade
from serve_graphs.decide.routing import (
    MemoryRouteStore,
    RouteSpec,
    RouteTable,
    Routing,
    user_bucket,
)
from serve_graphs.decide.tier import TierRunner
from tests.unit.graph import Graph, LocalStats, graph
from tests.unit.test_api import AUTH, DIGITS, KEY, digit_images

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

PREDICT = "/v1/models/digits/predict"
ROUTES = "/v1/models/digits/routes"
READER = "reader-key-for-unit-tests"
DEPLOYED = "3"


class Sure:
    """A model that answers ``label`` with confidence 0.9 for every row, and records the
    version that answered each row."""

    def __init__(self, label: int, version: str, calls: list[str], broken: set[str]) -> None:
        self.label, self.version, self.calls, self.broken = label, version, calls, broken

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        if self.version in self.broken:
            raise ServiceUnavailable(f"{self.version} cannot answer")
        self.calls.extend([self.version] * len(rows))
        probs = np.full((len(rows), 10), 0.1 / 9)
        probs[:, self.label] = 0.9
        return probs


class Registry:
    """Cascade versions 3 (deployed, label 3), 4 (label 4) and 7 (label 7); aliases
    champion -> 3 and challenger -> 4. Each version's cheap model answers its label; the
    expensive tier is never needed (0.9 clears every threshold here)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.broken: set[str] = set()  # cheap versions whose model fails

    def runner(self, version: str) -> TierRunner:
        name = f"digits-cheap/{version}"
        return TierRunner(Sure(int(version), name, self.calls, self.broken), name)

    def graph(self) -> Graph:
        return graph(
            self.runner(DEPLOYED),
            TierRunner(Sure(0, "digits-expensive/1", [], set()), "digits-expensive/1"),
            version=DEPLOYED,
            cheap_routed={f"digits-cheap/{v}": self.runner(v) for v in ("4", "7")},
        )

    def resolver(self, g: Graph):  # noqa: ANN201 - Routing's resolve, bound to graph g
        def resolve(ref: str) -> tuple[str, RoutedCascade]:
            version = {"champion": "3", "challenger": "4"}.get(ref, ref)  # no v7 here
            if version not in ("3", "4", "7"):
                raise NotFound(f"no calibrated cascade {ref!r} for digits")
            cheap = f"digits-cheap/{version}"
            return version, g.route_to(version, cheap, "digits-expensive/1", 0.5)

        return resolve

    def broken_version(self, version: str) -> None:
        self.broken.add(f"digits-cheap/{version}")


@pytest.fixture
def registry() -> Registry:
    return Registry()


def routing_for(registry: Registry, store: MemoryRouteStore | None = None, **kwargs) -> Routing:  # noqa: ANN003
    g = registry.graph()
    routing = Routing(
        g.caller, lambda: DEPLOYED, registry.resolver(g), store or MemoryRouteStore(), **kwargs
    )
    routing.graph = g  # for tests that slow its tiers down
    return routing


def service(registry: Registry, store: MemoryRouteStore | None = None, **kwargs):  # noqa: ANN003, ANN201
    routing = routing_for(registry, store, **kwargs)
    keys = KeyRing(
        [dev_key(KEY), dev_key(READER, "reader").model_copy(update={"scope": "predict"})]
    )
    live = LiveStats(DIGITS.name, LocalStats())
    http = TestClient(build_api(DIGITS, routing, keys=keys, max_instances=8, live=live))
    # One event loop for all its requests (as a replica has), so shadow copies, which
    # run after their primary's answer, are not cut off when a request's loop ends.
    http.__enter__()
    return http, routing


def eventually(read, timeout_s: float = 5.0):  # noqa: ANN001, ANN201
    """``read()`` once it is truthy: a shadow copy finishes after its primary's answer."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def predict(http: TestClient, user: str | None = None, path: str = PREDICT) -> tuple[str, int]:
    headers = {**AUTH, **({"x-scaledl-user": user} if user else {})}
    resp = http.post(path, json={"instances": digit_images(1)}, headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert resp.headers["x-scaledl-version"] == body["version"]
    return body["version"], body["predictions"][0]["label"]


def test_without_a_table_everything_goes_to_the_deployed_version(registry: Registry) -> None:
    http, _ = service(registry)
    assert predict(http, "ann") == ("3", 3)
    assert http.get(ROUTES, headers=AUTH).json()["table"] is None


def test_users_stick_to_one_version_and_the_split_follows_the_weights(registry: Registry) -> None:
    http, routing = service(registry)
    resp = http.put(ROUTES, json={"routes": {"champion": 90, "challenger": 10}}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert [(e["ref"], e["version"]) for e in resp.json()["table"]["routes"]] == [
        ("champion", "3"),
        ("challenger", "4"),
    ]
    first = {u: predict(http, f"user-{u}") for u in range(40)}
    again = {u: predict(http, f"user-{u}") for u in range(40)}
    assert first == again  # sticky: one user, one version
    assert {v for v, label in first.values()} == {"3", "4"}
    assert all(label == int(v) for v, label in first.values())  # that version answered
    # Over many users the split is the weights' (the hash is fixed, so this is exact).
    table = routing.table
    split = Counter(table.pick(user_bucket(f"u{i}")).version for i in range(20_000))
    assert 0.88 < split["3"] / 20_000 < 0.92


def test_moving_weight_moves_only_the_users_it_must() -> None:
    def table(a: int, b: int) -> RouteTable:
        return RouteTable(
            routes=[
                {"ref": "champion", "version": "3", "weight": a},
                {"ref": "challenger", "version": "4", "weight": b},
            ]
        )

    users = [f"user-{i}" for i in range(5000)]
    before = {u: table(90, 10).pick(user_bucket(u)).version for u in users}
    after = {u: table(80, 20).pick(user_bucket(u)).version for u in users}
    moved = Counter((before[u], after[u]) for u in users if before[u] != after[u])
    assert set(moved) == {("3", "4")}  # nobody leaves the challenger
    assert 0.08 < moved[("3", "4")] / len(users) < 0.12


def test_an_explicit_version_bypasses_the_table_and_weight_zero_hides_a_version(
    registry: Registry,
) -> None:
    http, _ = service(registry)
    resp = http.put(ROUTES, json={"routes": {"3": 100, "v7": 0}}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert {predict(http, f"user-{u}")[0] for u in range(30)} == {"3"}
    assert predict(http, path="/v1/models/digits/versions/7/predict") == ("7", 7)
    infer = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                         "data": np.asarray(digit_images(1)).reshape(-1).tolist()}]}  # fmt: skip
    resp = http.post("/v2/models/digits/versions/7/infer", json=infer, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_version"] == "7" and resp.json()["outputs"][0]["data"] == [7]
    meta = http.get("/v2/models/digits", headers=AUTH).json()
    assert meta["versions"] == ["3", "7"]
    resp = http.post("/v1/models/digits/versions/4/predict", json={"instances": digit_images(1)},
                     headers=AUTH)  # fmt: skip
    assert resp.status_code == 404 and "served versions: 3, 7" in resp.json()["error"]


def test_a_shadow_sees_a_copy_is_never_returned_and_its_agreement_is_recorded(
    registry: Registry,
) -> None:
    http, _ = service(registry)
    spec = {"routes": {"champion": 100}, "shadow": "7"}
    assert http.put(ROUTES, json=spec, headers=AUTH).status_code == 200
    for u in range(5):
        assert predict(http, f"user-{u}") == ("3", 3)  # the shadow's label 7 never returns

    def compared() -> dict | None:
        versions = http.get(ROUTES, headers=AUTH).json()["stats"]["versions"]
        return versions if "7" in versions and versions["7"]["shadow"]["compared"] == 5 else None

    versions = eventually(compared)
    assert versions["7"]["shadow"] == {
        "compared": 5,
        "agreement": 0.0,  # version 7 always says 7, the champion 3
        "failed": 0,
        "dropped": 0,
    }
    assert versions["7"]["requests"] == 0  # no answer of the shadow was returned
    assert versions["3"]["requests"] == 5 and versions["3"]["outcomes"]["ok"] == 5
    assert registry.calls.count("digits-cheap/7") == 5


def test_a_slow_or_failing_shadow_never_slows_or_fails_the_primary(registry: Registry) -> None:
    http, routing = service(registry, shadow_limit=2)
    routing.graph.cheap_handle.delay_s["digits-cheap/7"] = 1.0
    assert http.put(ROUTES, json={"routes": {"3": 100}, "shadow": "7"}, headers=AUTH).is_success

    async def burst() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = []
        for i in range(5):
            route = routing.choose(user=f"u{i}")
            predictions = await routing.predict(route, np.zeros((1, 64)))
            answers.append((route.version, predictions[0].label))
        elapsed = loop.time() - started
        await asyncio.gather(*routing.shadows)
        return answers, elapsed

    answers, elapsed = asyncio.run(burst())
    assert answers == [("3", 3)] * 5
    assert elapsed < 1.0  # five answers before the first 1 s shadow copy finished
    assert routing.shadow_dropped == 3  # two copies in flight at most; the rest dropped
    # ... and counted under the shadow's version, in instances, as Prometheus gets them
    shadow = http.get(ROUTES, headers=AUTH).json()["stats"]["versions"]["7"]["shadow"]
    assert shadow["dropped"] == 3

    registry.broken_version("7")
    http, routing = service(registry)
    assert http.put(ROUTES, json={"routes": {"3": 100}, "shadow": "7"}, headers=AUTH).is_success
    assert predict(http, "ann") == ("3", 3)
    versions = eventually(lambda: http.get(ROUTES, headers=AUTH).json()["stats"]["versions"])
    assert versions["7"]["shadow"]["failed"] == 1


def test_a_failing_challenger_degrades_only_its_own_answers(registry: Registry) -> None:
    registry.broken_version("4")
    http, _ = service(registry)
    assert http.put(ROUTES, json={"routes": {"3": 50, "4": 50}}, headers=AUTH).is_success
    statuses = Counter()
    for u in range(30):
        headers = {**AUTH, "x-scaledl-user": f"user-{u}"}
        resp = http.post(PREDICT, json={"instances": digit_images(1)}, headers=headers)
        statuses[(resp.headers.get("x-scaledl-version"), resp.status_code)] += 1
    assert set(statuses) == {("3", 200), ("4", 503)}  # the champion answers throughout
    versions = http.get(ROUTES, headers=AUTH).json()["stats"]["versions"]
    assert versions["3"]["outcomes"]["error"] == 0
    # Its 503s are a version that cannot answer, not load shed: errors, as a rollout sees
    assert versions["4"]["outcomes"]["error"] == statuses[("4", 503)] > 0
    assert versions["4"]["outcomes"]["shed"] == 0 and versions["4"]["error_rate"] == 1.0


@pytest.mark.parametrize(
    ("spec", "status", "message"),
    [
        ({"routes": {"champion": 90, "challenger": 20}}, 422, "sum to 110; they must sum to 100"),
        ({"routes": {"champion": 101, "challenger": -1}}, 422, "outside 0..100"),
        ({"routes": {}}, 422, "at least 1"),
        ({"routes": {"champion": 90, "v12": 10}}, 400, "route 'v12': no calibrated cascade"),
        ({"routes": {"champion": 50, "3": 50}}, 400, "a version appears twice"),
        ({"routes": {"champion": 100}, "shadow": "v3"}, 400, "shadow version 3 also takes"),
        ({"routes": {"champion": 100}, "shadow": "nope"}, 400, "route 'nope'"),
        ({"routes": {"champion": 100}, "mirror": "7"}, 422, "mirror"),
        ({"routes": {"champion": True, "challenger": 99}}, 422, "valid integer"),
        ({"routes": {"1": 20, "2": 20, "3": 20, "4": 20, "5": 20}}, 422, "at most 4"),
    ],
)
def test_a_bad_table_is_a_4xx_that_says_what_to_fix_and_changes_nothing(
    registry: Registry, spec: dict, status: int, message: str
) -> None:
    http, routing = service(registry)
    resp = http.put(ROUTES, json=spec, headers=AUTH)
    assert resp.status_code == status and message in resp.json()["error"], resp.text
    assert routing.table is None


def test_only_admin_keys_read_or_change_the_table(registry: Registry) -> None:
    http, _ = service(registry)
    reader = {"Authorization": f"Bearer {READER}"}
    spec = {"routes": {"champion": 100}}
    assert http.put(ROUTES, json=spec).status_code == 401
    assert http.put(ROUTES, json=spec, headers=reader).status_code == 403
    assert http.get(ROUTES, headers=reader).status_code == 403
    assert http.put(ROUTES, json=spec, headers=AUTH).json()["table"]["updated_by"] == "dev"
    assert http.delete(ROUTES, headers=AUTH).json()["table"] is None


def test_a_table_set_through_one_replica_reaches_the_others_through_the_store(
    registry: Registry,
) -> None:
    store = MemoryRouteStore()
    one, _ = service(registry, store)
    other, other_routing = service(registry, store)
    assert one.put(ROUTES, json={"routes": {"4": 100}}, headers=AUTH).is_success
    assert predict(other, "ann")[0] == "3"  # not yet polled
    asyncio.run(other_routing.refresh())
    assert predict(other, "ann") == ("4", 4)

    store.save(json.dumps({"routes": [{"ref": "x", "version": "4", "weight": 60}]}))  # hand-edited
    asyncio.run(other_routing.refresh())
    assert predict(other, "ann") == ("4", 4)  # a broken stored table leaves the current one
    assert one.delete(ROUTES, headers=AUTH).is_success
    asyncio.run(other_routing.refresh())
    assert predict(other, "ann") == ("3", 3)


def test_the_cli_spec_parses_into_the_same_table() -> None:
    from app.cli.routes import parse_routes

    assert parse_routes(["champion=90", "challenger=10"], "v7") == RouteSpec(
        routes={"champion": 90, "challenger": 10}, shadow="v7"
    )
    with pytest.raises(ValueError, match="champion90"):
        parse_routes(["champion90"], None)
    with pytest.raises(ValueError, match="whole percent"):
        parse_routes(["champion=ninety"], None)


def test_a_request_keeps_its_version_through_a_swap_or_a_new_table(registry: Registry) -> None:
    deployed = ["3"]
    g = registry.graph()
    routing = Routing(g.caller, lambda: deployed[0], registry.resolver(g), MemoryRouteStore())

    async def scenario() -> list[tuple[str, int]]:
        await routing.set(RouteSpec(routes={"3": 50, "4": 50}), by="test")
        routes = [routing.choose(user=f"user-{u}") for u in range(20)]
        deployed[0] = "4"  # a promotion lands while the requests run
        await routing.set(RouteSpec(routes={"7": 100}), by="test")  # and a new table
        return [(r.version, (await routing.predict(r, np.zeros((1, 64))))[0].label) for r in routes]

    answers = asyncio.run(scenario())
    assert {v for v, _ in answers} == {"3", "4"}
    assert all(label == int(v) for v, label in answers)


def test_a_poll_that_read_the_store_before_a_set_does_not_undo_it(registry: Registry) -> None:
    import threading

    class SlowStore(MemoryRouteStore):
        def __init__(self) -> None:
            super().__init__()
            self.reading, self.release = threading.Event(), threading.Event()

        def load(self) -> str | None:
            text = self.text
            self.reading.set()
            self.release.wait(5)
            return text

    store = SlowStore()
    routing = routing_for(registry, store)

    async def scenario() -> None:
        poll = asyncio.create_task(routing.refresh())
        await asyncio.to_thread(store.reading.wait, 5)  # the poll holds the old (empty) text
        await routing.set(RouteSpec(routes={"4": 100}), by="test")
        store.release.set()
        await poll

    asyncio.run(scenario())
    assert routing.table is not None and routing.table.routes[0].version == "4"


def test_a_bug_counts_against_its_version_and_a_registry_outage_is_a_503(
    registry: Registry,
) -> None:
    class DownStore(MemoryRouteStore):
        def save(self, text: str | None) -> None:
            raise OSError("database is locked")

    http, routing = service(registry, DownStore())
    resp = http.put(ROUTES, json={"routes": {"4": 100}}, headers=AUTH)
    assert resp.status_code == 503 and "registry could not be reached" in resp.json()["error"]
    assert routing.table is None

    routing.graph.cheap.runner.model.broken.add("digits-cheap/3")  # fails as a bug would
    routing.graph.cheap.runner.model.predict_proba = _bug
    http = TestClient(http.app, raise_server_exceptions=False)
    resp = http.post(PREDICT, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 500 and resp.headers["x-scaledl-version"] == "3"
    versions = http.get(ROUTES, headers=AUTH).json()["stats"]["versions"]
    assert versions["3"]["outcomes"]["error"] == 1


def _bug(rows: np.ndarray) -> np.ndarray:
    raise ValueError("a bug")


def test_routed_versions_bound_before_an_int8_change_are_bound_again(registry: Registry) -> None:
    """serve.int8_tiers changes what a routed version's tiers run: the versions already
    in the table are resolved again, as a new table's would be."""
    resolved: list[str] = []
    routing = routing_for(registry)
    resolve = routing.resolve

    def counting(ref: str):  # noqa: ANN202
        resolved.append(ref)
        return resolve(ref)

    routing.resolve = counting

    async def scenario() -> tuple[object, object]:
        await routing.set(RouteSpec(routes={"3": 50, "4": 50}, shadow="7"), by="test")
        before = routing.variants["4"]
        await routing.rebind()
        return before, routing.variants["4"]

    before, after = asyncio.run(scenario())
    assert before is not after and sorted(resolved) == ["3", "3", "4", "4", "7", "7"]
    assert routing.table is not None and routing.table.versions() == ["3", "4", "7"]
