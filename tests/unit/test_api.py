"""The HTTP surface without Ray: real models (untrained weights) behind the graph's own
cascade, wired as the deployments wire it (tests/unit/graph.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from app.errors import ServiceUnavailable
from app.keys import KeyRing, dev_key
from app.model_artifact import LoadedModel, ModelMeta
from app.sections import ServeConfig
from app.workloads import get_workload
from serve_graphs.api.app import build_api
from serve_graphs.decide.routing import Routing
from serve_graphs.decide.tier import TierRunner
from tests.unit.graph import Graph, graph

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

DIGITS = get_workload("digits")
URL = "/v1/models/digits/predict"
KEY = "s3cret-key-for-unit-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Model:
    """A loaded model that records the rows of each forward pass, and can fail or wait."""

    def __init__(self, inner: object, calls: list[int], fail: Exception | None = None) -> None:
        self.inner, self.calls, self.fail = inner, calls, fail
        self.delay_s = 0.0

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(len(rows))
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return self.inner.predict_proba(rows)


def local_tier(tier: str, calls: list[int], fail: Exception | None = None) -> TierRunner:
    """A tier's model (untrained weights) as a tier replica runs it."""
    torch.manual_seed(0)
    model = LoadedModel(DIGITS.build_model(tier).eval(), ModelMeta("digits", tier, "v0"), DIGITS)
    return TierRunner(Model(model, calls, fail), f"digits-{tier}/1")


def digits_graph(
    threshold: float, calls: dict[str, list[int]] | None = None, **kwargs: object
) -> Graph:
    calls = calls if calls is not None else {"cheap": [], "expensive": []}
    return graph(
        local_tier("cheap", calls["cheap"]),
        local_tier("expensive", calls["expensive"]),
        threshold=threshold,
        **kwargs,
    )


def client(
    threshold: float, calls: dict[str, list[int]] | None = None, max_instances: int = 8
) -> TestClient:
    return TestClient(api_for(digits_graph(threshold, calls), max_instances))


def api_for(g: Graph, max_instances: int = 8, keys: KeyRing | None = None, **kwargs):  # noqa: ANN003, ANN201
    keys = keys or KeyRing([dev_key(KEY)])
    routing = Routing.fixed(g.caller, g.caller.version)
    return build_api(DIGITS, routing, keys=keys, max_instances=max_instances, **kwargs)


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
    ({"instances": [[10**400] + [0] * 63]}, 400, "instance 0 holds a number too large"),
    ({"instances": [[[10**400] + [0] * 7] + [[0] * 8] * 7]}, 400, "too large for a float64"),
    ({"instances": [[0.5] * 63 + [-(10**309)]]}, 400, "too large for a float64"),
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


def test_when_the_cheap_tier_cannot_answer_the_request_is_a_503_with_retry_after() -> None:
    g = digits_graph(0.5)
    g.cheap.runner.model.fail = ServiceUnavailable("the tier is at capacity: retry shortly")
    resp = TestClient(api_for(g)).post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
    assert resp.json() == {"error": "the tier is at capacity: retry shortly"}


def test_when_the_expensive_tier_cannot_answer_the_cheap_answer_returns_degraded() -> None:
    g = digits_graph(1.01)  # always escalate
    g.expensive.runner.model.fail = ServiceUnavailable("the expensive tier is away")
    seen = Recorder()
    resp = TestClient(api_for(g, observer=seen)).post(
        URL, json={"instances": digit_images(2)}, headers=AUTH
    )
    assert resp.status_code == 200
    assert [(p["tier"], p["degraded"]) for p in resp.json()["predictions"]] == [
        ("cheap", True),
        ("cheap", True),
    ]
    assert seen.degraded_rows == [(2, "unavailable")]


def test_a_bug_in_the_expensive_tier_degrades_with_reason_error_and_is_not_retried() -> None:
    calls: dict[str, list[int]] = {"cheap": [], "expensive": []}
    g = digits_graph(1.01, calls)
    g.expensive.runner.model.fail = ValueError("a bug in the expensive model")
    seen = Recorder()
    resp = TestClient(api_for(g, observer=seen)).post(
        URL, json={"instances": digit_images(2)}, headers=AUTH
    )
    assert resp.status_code == 200 and all(p["degraded"] for p in resp.json()["predictions"])
    assert seen.degraded_rows == [(2, "error")]
    assert calls["expensive"] == [2]  # one forward pass: a bug is not retried


def test_a_body_over_the_limit_is_a_413_announced_or_streamed() -> None:
    api = api_for(digits_graph(0.0), max_body_bytes=1024)
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


def test_a_body_that_arrives_too_slowly_is_a_408_while_prompt_requests_are_answered() -> None:
    """A slowloris sender, on a real socket (uvicorn, as the ingress replica serves): cut
    off at serve.body_timeout_s with a JSON 408 that says so; meanwhile the server
    answers others."""
    import threading

    import httpx

    from tests.conftest import slowloris

    api = api_for(digits_graph(0.0), body_timeout_s=1.0)
    with served(api) as port:
        body = json.dumps({"instances": digit_images(1)}).encode()
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        prompt = threading.Timer(0.3, lambda: answered.append(httpx.post(
            f"http://127.0.0.1:{port}{URL}", json={"instances": digit_images(1)},
            headers=AUTH, timeout=10).status_code))  # fmt: skip
        answered: list[int] = []
        prompt.start()
        answer, seconds = slowloris(port, URL, headers, body, give_up_s=5)
        prompt.join()
        assert answered == [200]  # answered while the slow body was still arriving
        assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 408 Request Timeout", answer
        assert b"serve.body_timeout_s" in answer and seconds < 5


@contextlib.contextmanager
def served(api: object) -> Iterator[int]:
    """``api`` on a real loopback socket (uvicorn, as an ingress replica serves it); its port."""
    import threading

    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_bodies_cut_off_mid_stream_hold_nothing_and_fail_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Clients that announce a body and hang up part way: no 500 is counted or logged,
    no connection is left waiting, and the next client is answered."""
    import socket

    import httpx

    seen = Recorder()
    api = api_for(digits_graph(0.0), observer=seen, body_timeout_s=5.0)
    body = json.dumps({"instances": digit_images(4)}).encode()
    head = (f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\r\n")  # fmt: skip
    with caplog.at_level(logging.WARNING), served(api) as port:
        for cut in (0, 1, len(body) // 2, len(body) - 1):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(head.encode() + body[:cut])
        started = time.monotonic()
        json_type = {**AUTH, "content-type": "application/json"}
        resp = httpx.post(f"http://127.0.0.1:{port}{URL}", content=body, headers=json_type)
        assert resp.status_code == 200 and time.monotonic() - started < 5  # no queue behind them
        deadline = time.monotonic() + 5  # the server notices the hang-ups
        while len(seen.requests) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [status for _, status, _ in seen.requests] == [499] * 4 + [200], seen.requests
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


DEEP = 100_000
HOSTILE_BODIES = [  # raw bytes as a client may send them, with their content type
    ("deeply nested arrays", b'{"instances": ' + b"[" * DEEP + b"]" * DEEP + b"}", None),
    (
        "deeply nested objects",
        b'{"instances": [' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"]}",
        None,
    ),  # fmt: skip
    ("an integer of 5,000 digits", b'{"instances": [[' + b"9" * 5000 + b"]]}", None),
    ("an empty body", b"", None),
    ("a top-level array", b"[[0, 1]]", None),
    ("Latin-1 bytes", '{"instances": [["\xe9"]]}'.encode("latin-1"), None),
    ("UTF-16", '{"instances": [[1]]}'.encode("utf-16"), None),
    ("a form", b"instances=1", "application/x-www-form-urlencoded"),
    ("multipart", b"--x\r\n\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    ("plain text", b"hello", "text/plain"),
    ("many empty instances", b'{"instances": [' + b",".join([b"[]"] * 100_000) + b"]}", None),
]


@pytest.mark.parametrize(("what", "raw", "content_type"), HOSTILE_BODIES,
                         ids=[h[0] for h in HOSTILE_BODIES])  # fmt: skip
def test_hostile_bodies_get_a_json_4xx_never_a_500(
    what: str, raw: bytes, content_type: str | None
) -> None:
    headers = {**AUTH, "content-type": content_type or "application/json"}
    resp = client(0.5).post(URL, content=raw, headers=headers)
    assert 400 <= resp.status_code < 500, (what, resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert error and "Traceback" not in error and len(error) < 500, error


def test_a_prediction_past_the_timeout_is_a_504() -> None:
    g = digits_graph(0.0, cfg=ServeConfig(request_timeout_s=0.2))
    g.cheap.runner.model.delay_s = 1.0
    api = api_for(g, request_timeout_s=0.2)
    resp = TestClient(api).post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 504 and "serve.request_timeout_s" in resp.json()["error"]


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.answered: list[tuple[str, str, bool]] = []
        self.degraded_rows: list[tuple[int, str]] = []
        self.dropped: list[tuple[str, str, int]] = []

    def request(self, route: str, status: int, seconds: float, version: str, shed: bool) -> None:
        assert seconds >= 0
        self.requests.append((route, status, version))

    def predictions(self, version: str, predictions) -> None:  # noqa: ANN001
        self.answered += [(p.tier, p.model_version, p.degraded) for p in predictions]

    def shadow(self, *args) -> None:  # noqa: ANN002
        raise AssertionError("no shadow is routed here")

    def shadow_dropped(self, primary: str, shadow: str, n: int) -> None:
        self.dropped.append((primary, shadow, n))

    def degraded(self, n: int, reason: str) -> None:
        self.degraded_rows.append((n, reason))


def test_every_request_and_answer_reaches_the_observer_by_route_and_version() -> None:
    seen = Recorder()
    http = TestClient(api_for(digits_graph(0.9999), observer=seen))
    assert http.post(URL, json={"instances": digit_images(2)}, headers=AUTH).status_code == 200
    assert http.post(URL, json={"instances": digit_images(1)}).status_code == 401
    assert http.get("/v2/models/digits/versions/v3/ready", headers=AUTH).status_code == 200
    assert http.get("/no/such/path/42").status_code == 404
    assert seen.requests == [
        ("/v1/predict", 200, "3"),
        ("/v1/predict", 401, "none"),
        ("/v2/ready", 200, "none"),
        ("other", 404, "none"),  # a raw path never becomes a tag
    ]
    assert seen.answered == [("expensive", "digits-expensive/1", False)] * 2


def test_every_answer_is_one_json_access_line_with_version_tier_status_and_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray._common.formatters import JSONFormatter

    http = TestClient(api_for(digits_graph(0.0)))  # the cheap tier is sure of everything
    with caplog.at_level("INFO", logger="ray.serve"):
        assert http.post(URL, json={"instances": digit_images(3)}, headers=AUTH).status_code == 200
        assert http.post(URL, json={"instances": digit_images(1)}).status_code == 401
    lines = [json.loads(JSONFormatter().format(r)) for r in caplog.records]  # as Serve writes
    lines = [line for line in lines if line.get("event") == "request"]
    assert [(line["status"], line["version"], line["tier"]) for line in lines] == [
        (200, "3", "cheap"),
        (401, "none", "none"),
    ]
    assert all(line["model"] == "digits" and line["endpoint"] == "/v1/predict" for line in lines)
    assert all(0 < line["latency_ms"] < 10_000 for line in lines)
    assert KEY not in caplog.text and "Bearer" not in caplog.text


def test_a_bug_in_the_cheap_tier_is_a_json_500_counted_as_such_and_not_retried() -> None:
    calls: dict[str, list[int]] = {"cheap": [], "expensive": []}
    g = digits_graph(0.0, calls)
    g.cheap.runner.model.fail = ValueError("a bug in a tier")
    seen = Recorder()
    http = TestClient(api_for(g, observer=seen), raise_server_exceptions=False)
    resp = http.post(URL, json={"instances": digit_images(1)}, headers=AUTH)
    assert resp.status_code == 500
    assert "the cheap tier failed on this request (ValueError)" in resp.json()["error"]
    assert calls["cheap"] == [1]  # not retried as if the replica had died
    assert seen.requests == [("/v1/predict", 500, "3")]
    wrong = http.delete(URL, headers=AUTH)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_the_cost_report_is_admin_only_and_counts_live_traffic() -> None:
    from app.keys import ApiKey, key_sha256

    reader = ApiKey(id="app", scope="predict", sha256=key_sha256("predict-only-key-123"))
    http = TestClient(api_for(digits_graph(0.9999), keys=KeyRing([dev_key(KEY), reader])))
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


def test_a_request_the_client_abandons_counts_as_499_not_500() -> None:
    """Serve cancels a request whose client has gone (wrk closing its connections, a
    browser tab closed): no client saw a 500, so none is counted."""
    from serve_graphs.api.observe import RequestMetrics

    seen = Recorder()
    started = asyncio.Event()

    async def slow_app(scope, receive, send) -> None:  # noqa: ANN001
        started.set()
        await asyncio.sleep(60)

    async def abandon() -> None:
        middleware = RequestMetrics(slow_app, seen)
        scope = {"type": "http", "path": "/v1/models/digits/predict", "state": {}}
        task = asyncio.create_task(middleware(scope, None, None))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    assert seen.requests == [("/v1/predict", 499, "none")]


def test_a_key_over_its_rate_limit_gets_a_429_with_retry_after_and_others_go_on() -> None:
    from app.keys import ApiKey, key_sha256
    from app.sections import RateLimit
    from serve_graphs.api.limits import RateLimiter
    from tests.conftest import FakeClock

    clock = FakeClock()
    other = ApiKey(id="other", scope="predict", sha256=key_sha256("another-key-for-tests"))
    limits = RateLimiter({"predict": RateLimit(per_s=0.5, burst=2)}, clock=clock)
    http = TestClient(
        api_for(digits_graph(0.0), keys=KeyRing([dev_key(KEY), other]), limits=limits)
    )
    body = {"instances": digit_images(1)}
    assert [http.post(URL, json=body, headers=AUTH).status_code for _ in range(2)] == [200, 200]
    resp = http.post(URL, json=body, headers=AUTH)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert "over its rate limit of 0.5 requests/s (burst 2)" in resp.json()["error"]
    other_auth = {"Authorization": "Bearer another-key-for-tests"}
    assert http.post(URL, json=body, headers=other_auth).status_code == 200  # its own bucket
    clock.now += 2  # one token back
    assert http.post(URL, json=body, headers=AUTH).status_code == 200
    assert http.post(URL, json=body, headers=AUTH).status_code == 429


def test_readiness_is_a_503_with_the_reason_until_the_tiers_run() -> None:
    from serve_graphs.decide.readiness import Readiness

    replicas = {"cheap": 1, "expensive": 0}
    cold = set()
    readiness = Readiness(replicas, lambda: cold)
    http = TestClient(api_for(digits_graph(0.5), readiness=readiness))
    for path in (
        "/v2/health/ready",
        "/v2/models/digits/ready",
        "/v2/models/digits/versions/v3/ready",
    ):
        resp = http.get(path, headers=AUTH)
        assert resp.status_code == 503, path
        assert resp.json()["ready"] is False
        assert "the expensive tier has no running replica" in resp.json()["error"]
    cold.add("expensive")  # min_replicas 0: the first request starts one
    assert http.get("/v2/health/ready").json() == {"ready": True}
    cold.clear()
    replicas["expensive"] = 1
    assert http.get("/v2/models/digits/versions/3/ready", headers=AUTH).json() == {
        "name": "digits",
        "ready": True,
    }
    readiness.loading("7")  # a routed version, loading: only it is not ready
    readiness.loaded("7", "ModelNotFound")
    assert readiness.reason(["3", "7"], "3") == "version 7's models failed to load: ModelNotFound"
    assert readiness.reason(["3"], "3") is None
    # Without a key, the reason names no version and no load error.
    public = readiness.reason(["3", "7"], "3", public=True)
    assert public is not None and "7" not in public and "ModelNotFound" not in public


def test_the_cost_report_counts_degraded_answers_as_escalated() -> None:
    g = digits_graph(1.01)  # everything escalates
    g.expensive.runner.model.fail = ServiceUnavailable("the expensive tier is away")
    http = TestClient(api_for(g))
    assert http.post(URL, json={"instances": digit_images(2)}, headers=AUTH).status_code == 200
    report = http.get("/v1/models/digits/cost", headers=AUTH).json()
    assert report["escalated_share"] == report["degraded_share"] == 1.0
    assert report["expensive_share"] == 0.0
