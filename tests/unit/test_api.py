"""The HTTP surface without Ray: real models (untrained weights) behind the cascade."""

from __future__ import annotations

import asyncio
import json
import warnings

import numpy as np
import pytest
import torch

from app.errors import ServiceUnavailable
from app.keys import KeyRing, dev_key
from app.model_artifact import LoadedModel, ModelMeta
from app.workloads import get_workload
from serve_graphs.api import build_api
from serve_graphs.cascade import Cascade, TierAnswer, TierFn
from serve_graphs.routing import Routing

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

DIGITS = get_workload("digits")
URL = "/v1/models/digits/predict"
KEY = "s3cret-key-for-unit-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


def local_tier(tier: str, calls: list[int]) -> TierFn:
    torch.manual_seed(0)
    model = LoadedModel(DIGITS.build_model(tier).eval(), ModelMeta("digits", tier, "v0"), DIGITS)

    async def predict(instances: np.ndarray) -> TierAnswer:
        calls.append(len(instances))
        return TierAnswer(model.predict_proba(instances), f"digits-{tier}/1")

    return predict


def client(
    threshold: float, calls: dict[str, list[int]] | None = None, max_instances: int = 8
) -> TestClient:
    calls = calls if calls is not None else {"cheap": [], "expensive": []}
    cascade = Cascade(
        local_tier("cheap", calls["cheap"]), local_tier("expensive", calls["expensive"]), threshold
    )
    return TestClient(api_for(cascade, max_instances))


def api_for(cascade: Cascade, max_instances: int = 8, keys: KeyRing | None = None):  # noqa: ANN201
    keys = keys or KeyRing([dev_key(KEY)])
    return build_api(DIGITS, Routing.fixed(cascade, "3"), keys=keys, max_instances=max_instances)


def digit_images(n: int) -> list[list[list[int]]]:
    return (
        DIGITS.builtin_source()[list(DIGITS.feature_columns)]
        .head(n)
        .to_numpy()
        .reshape(n, 8, 8)
        .tolist()
    )


def test_predicts_flat_and_2d_instances_with_tier_and_version() -> None:
    images = digit_images(2)
    flat = np.asarray(images[1]).reshape(-1).tolist()
    resp = client(threshold=0.0).post(URL, json={"instances": [images[0], flat]}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "digits"
    assert [p["tier"] for p in body["predictions"]] == ["cheap", "cheap"]
    assert body["predictions"][0]["model_version"] == "digits-cheap/1"
    assert all(0 <= p["label"] <= 9 and 0 < p["confidence"] <= 1 for p in body["predictions"])


def test_only_unsure_instances_reach_the_expensive_tier() -> None:
    calls: dict[str, list[int]] = {"cheap": [], "expensive": []}
    # An untrained cheap tier is never 99.99 % sure: everything escalates, in one call.
    resp = client(threshold=0.9999, calls=calls).post(
        URL, json={"instances": digit_images(3)}, headers=AUTH
    )
    assert [p["tier"] for p in resp.json()["predictions"]] == ["expensive"] * 3
    assert calls == {"cheap": [3], "expensive": [3]}


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "missing API key"),
        ({"Authorization": "Bearer wrong"}, 401, "not recognised"),
        ({"Authorization": "Basic abc"}, 401, "missing API key"),
    ],
)
def test_predict_requires_the_key(headers: dict, status: int, message: str) -> None:
    resp = client(0.5).post(URL, json={"instances": digit_images(1)}, headers=headers)
    assert resp.status_code == status
    assert message in resp.json()["error"]
    assert resp.headers["www-authenticate"] == "Bearer"


def test_health_and_docs_are_open() -> None:
    c = client(0.5)
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/docs").status_code == 200
    assert URL.replace("digits", "{name}") in c.get("/openapi.json").json()["paths"]


BAD_BODIES = [
    ({"instances": []}, 422, "at least 1 item"),
    ({"instances": 5}, 422, "should be a valid array"),
    ({"inputs": [[1]]}, 422, "instances: Field required"),
    ({"instances": [[0] * 63]}, 400, "has 63 values; the model takes 64"),
    ({"instances": [[[1, 2], [3]]]}, 400, "ragged"),
    ({"instances": [["a"] * 64]}, 400, "'a', which is not a number"),
    ({"instances": [[True] * 64]}, 400, "True, which is not a number"),
    ({"instances": [[0] * 10 + [17] + [0] * 53]}, 400, "instance 0: px_10: in_range(0, 16)"),
    ({"instances": [[0] * 64] * 9}, 413, "9 instances in one request; the limit is 8"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
def test_bad_bodies_get_a_4xx_that_says_what_is_wrong(
    body: dict, status: int, message: str
) -> None:
    resp = client(0.5).post(URL, json=body, headers=AUTH)
    assert resp.status_code == status
    assert message in resp.json()["error"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"{not json", "not valid JSON"), (b'{"instances": [[NaN, 1]]}', "NaN or infinity")],
)
def test_malformed_json_and_non_finite_numbers_are_400(raw: bytes, message: str) -> None:
    resp = client(0.5).post(URL, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert resp.status_code == 400
    assert message in resp.json()["error"]


def test_unknown_model_is_404() -> None:
    resp = client(0.5).post(
        "/v1/models/cats/predict", json={"instances": digit_images(1)}, headers=AUTH
    )
    assert resp.status_code == 404
    assert "serves 'digits'" in resp.json()["error"]


async def unavailable(instances: np.ndarray) -> TierAnswer:
    raise ServiceUnavailable("the tier is at capacity: retry shortly")


def test_when_the_cheap_tier_cannot_answer_the_request_is_a_503_with_retry_after() -> None:
    cascade = Cascade(unavailable, local_tier("expensive", []), threshold=0.5)
    resp = TestClient(api_for(cascade)).post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
    assert resp.json() == {"error": "the tier is at capacity: retry shortly"}


def test_when_the_expensive_tier_cannot_answer_the_cheap_answer_returns_degraded() -> None:
    degraded: list[tuple[int, str]] = []
    cascade = Cascade(
        local_tier("cheap", []),
        unavailable,
        threshold=1.01,  # always escalate
        on_degraded=lambda n, reason: degraded.append((n, reason)),
    )
    resp = TestClient(api_for(cascade)).post(URL, json={"instances": digit_images(2)}, headers=AUTH)
    assert resp.status_code == 200
    assert [(p["tier"], p["degraded"]) for p in resp.json()["predictions"]] == [
        ("cheap", True),
        ("cheap", True),
    ]
    assert degraded == [(2, "unavailable")]


def test_a_body_over_the_limit_is_a_413_announced_or_streamed() -> None:
    cascade = Cascade(local_tier("cheap", []), local_tier("expensive", []), 0.0)
    api = build_api(
        DIGITS, Routing.fixed(cascade, "3"), keys=KeyRing([dev_key(KEY)]), max_instances=8,
        max_body_bytes=1024,
    )  # fmt: skip
    big = {"instances": digit_images(8)}  # about 1.8 KB of JSON
    resp = TestClient(api).post(URL, json=big, headers=AUTH)
    assert resp.status_code == 413 and "serve.max_body_bytes" in resp.json()["error"]

    def chunks():  # no content-length: the body streams in
        yield b'{"instances": ['
        for i in range(40):
            yield (b"," if i else b"") + json.dumps(digit_images(1)[0]).encode()
        yield b"]}"

    resp = TestClient(api).post(
        URL, content=chunks(), headers={**AUTH, "content-type": "application/json"}
    )
    assert resp.status_code == 413 and "serve.max_body_bytes" in resp.json()["error"]
    small = TestClient(api).post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert small.status_code == 200


def test_a_prediction_past_the_timeout_is_a_504() -> None:
    async def slow(instances: np.ndarray) -> TierAnswer:
        await asyncio.sleep(5)
        raise AssertionError("not reached")

    api = build_api(
        DIGITS, Routing.fixed(Cascade(slow, slow, 0.0), "3"), keys=KeyRing([dev_key(KEY)]),
        max_instances=8, request_timeout_s=0.2,
    )  # fmt: skip
    resp = TestClient(api).post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 504 and "serve.request_timeout_s" in resp.json()["error"]


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.answered: list[tuple[str, str, bool]] = []

    def request(self, route: str, status: int, seconds: float, version: str) -> None:
        assert seconds >= 0
        self.requests.append((route, status, version))

    def predictions(self, predictions) -> None:  # noqa: ANN001
        self.answered += [(p.tier, p.model_version, p.degraded) for p in predictions]

    def shadow(self, *args) -> None:  # noqa: ANN002
        raise AssertionError("no shadow is routed here")


def test_every_request_and_answer_reaches_the_observer_by_route_and_version() -> None:
    seen = Recorder()
    cascade = Cascade(local_tier("cheap", []), local_tier("expensive", []), 0.9999)
    api = build_api(
        DIGITS, Routing.fixed(cascade, "3"), keys=KeyRing([dev_key(KEY)]), max_instances=8,
        observer=seen,
    )  # fmt: skip
    http = TestClient(api)
    assert http.post(URL, json={"instances": digit_images(2)}, headers=AUTH).status_code == 200
    assert http.post(URL, json={"instances": digit_images(1)}).status_code == 401
    assert http.get("/v2/models/digits/versions/3/ready").status_code == 200
    assert http.get("/no/such/path/42").status_code == 404
    assert seen.requests == [
        ("/v1/predict", 200, "3"),
        ("/v1/predict", 401, "none"),
        ("/v2/ready", 200, "none"),
        ("other", 404, "none"),  # a raw path never becomes a tag
    ]
    assert seen.answered == [("expensive", "digits-expensive/1", False)] * 2


def test_a_bug_is_a_json_500_and_a_wrong_method_keeps_its_allow_header() -> None:
    async def broken(instances: np.ndarray) -> TierAnswer:
        raise ValueError("a bug in a tier")

    api = build_api(
        DIGITS, Routing.fixed(Cascade(broken, broken, 0.0), "3"), keys=KeyRing([dev_key(KEY)]),
        max_instances=8,
    )  # fmt: skip
    http = TestClient(api, raise_server_exceptions=False)
    resp = http.post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 500 and resp.json() == {
        "error": "internal error; it is logged with this request's id"
    }
    wrong = http.delete(URL, headers=AUTH)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_the_cost_report_is_admin_only_and_counts_live_traffic() -> None:
    from app.keys import ApiKey, key_sha256
    from serve_graphs.observe import CostMeter

    costs = CostMeter()
    cascade = Cascade(
        local_tier("cheap", []), local_tier("expensive", []), 0.9999,
        on_tier_call=costs.tier_call,
    )  # fmt: skip
    reader = ApiKey(id="app", scope="predict", sha256=key_sha256("predict-only-key-123"))
    api = build_api(
        DIGITS, Routing.fixed(cascade, "3"), keys=KeyRing([dev_key(KEY), reader]),
        max_instances=8, costs=costs,
    )  # fmt: skip
    http = TestClient(api)
    for n in (1, 3):
        assert http.post(URL, json={"instances": digit_images(n)}, headers=AUTH).status_code == 200
    url = "/v1/models/digits/cost"
    forbidden = http.get(url, headers={"Authorization": "Bearer predict-only-key-123"})
    assert forbidden.status_code == 403
    report = http.get(url, headers=AUTH).json()
    # An untrained cheap tier is never 99.99 % sure: all 4 instances escalate.
    assert (report["requests"], report["instances"]) == (2, 4)
    assert report["expensive_share"] == report["escalated_share"] == 1.0
    assert report["cheap_ms_per_instance"] > 0 and report["expensive_ms_per_instance"] > 0
    assert report["compute_ms_per_request"] == pytest.approx(
        2 * (report["cheap_ms_per_instance"] + report["expensive_ms_per_instance"])
    )
