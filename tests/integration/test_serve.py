"""The Serve graph over real HTTP: ingress + cascade + batched tiers from the registry.

What a client sees of a running service: accurate answers, auth and errors, the Open
Inference Protocol, A/B and shadow routing, degraded answers and shed load. Changing a
running service under load (hot swaps, autoscaling) is test_serve_changes.py.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.registry import Registry
from app.serving import Endpoint
from serve_graphs.api.observe import VERSION_HEADER
from tests.ray_platform import AUTH, KEY, Platform, export_samples, redeploy


def test_the_cascade_answers_the_test_split_accurately(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    x, y = test_rows
    resp = httpx.post(
        endpoint.predict_url, json={"instances": x.tolist()}, headers=AUTH, timeout=60
    )
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    accuracy = np.mean([p["label"] == label for p, label in zip(predictions, y, strict=True)])
    assert accuracy >= 0.95
    versions = {p["tier"]: p["model_version"] for p in predictions}
    assert versions == {
        "cheap": f"digits-cheap/{platform.cascade.cheap_version}",
        "expensive": f"digits-expensive/{platform.cascade.expensive_version}",
    }
    # The calibrated threshold serves: the live split matches what calibration reported
    # (batching may move a confidence in its last bits, so allow a row or two).
    escalated = sum(p["tier"] == "expensive" for p in predictions) / len(predictions)
    assert escalated == pytest.approx(platform.cascade.test.escalated_share, abs=0.01)
    assert accuracy == pytest.approx(platform.cascade.test.cascade_accuracy, abs=0.01)
    # The live cost report (admin) has seen exactly this traffic (the module's first).
    cost = httpx.get(f"{endpoint.base_url}/v1/models/digits/cost", headers=AUTH).json()
    assert (cost["requests"], cost["instances"]) == (1, len(predictions))
    assert cost["escalated_share"] == pytest.approx(escalated)
    assert cost["compute_ms_per_request"] > 0


def test_concurrent_single_requests_all_succeed(endpoint: Endpoint, test_rows) -> None:  # noqa: ANN001
    import asyncio

    x, _ = test_rows

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        endpoint.predict_url, json={"instances": [row.tolist()]}, headers=AUTH
                    )
                    for row in x[:64]
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(fire()) == [200] * 64


def test_request_id_is_echoed_and_errors_are_4xx(endpoint: Endpoint) -> None:
    resp = httpx.post(
        endpoint.predict_url,
        json={"instances": [[0] * 64]},
        headers={**AUTH, "x-request-id": "trace-123"},
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "trace-123"
    assert httpx.post(endpoint.predict_url, json={"instances": [[0] * 64]}).status_code == 401
    bad = httpx.post(
        endpoint.predict_url, content=b"{oops", headers={**AUTH, "content-type": "application/json"}
    )
    assert (bad.status_code, bad.json()) == (400, {"error": "request body is not valid JSON"})
    assert httpx.get(f"{endpoint.base_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{endpoint.base_url}/docs").status_code == 200


def requests_counted() -> Counter:
    """``ray_scaledl_requests_total`` by (route, status, cascade_version), summed over
    replicas, as Prometheus would scrape it from the node's metrics export."""
    counts: Counter = Counter()
    for sample in export_samples("ray_scaledl_requests_total"):
        labels = sample.labels
        counts[(labels["route"], labels["status"], labels["cascade_version"])] += sample.value
    return counts


def settled_counts() -> Counter:
    """The counts once two reads a few report intervals apart agree: the export lags
    the requests by up to its report interval (1 s here)."""
    last, deadline = requests_counted(), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(3)
        now = requests_counted()
        if now == last:
            return now
        last = now
    return last


def test_the_metrics_export_counts_each_request_by_status_and_version_as_sent(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """What an error-rate alert or a rollout gate reads: Ray's export of the graph's
    request counter agrees with what the client received, per status and version."""
    x, _ = test_rows
    deployed = Registry(platform.settings.tracking_uri).resolve("digits-cascade", "champion")
    version = deployed.version
    before = settled_counts()  # the earlier tests' requests, once all exported
    sent: Counter = Counter()
    with httpx.Client(timeout=30) as http:
        for i, row in enumerate(x[:12]):
            url = endpoint.predict_url
            if i % 3 == 0:  # the same version, named explicitly
                url = f"{endpoint.base_url}/v1/models/digits/versions/v{version}/predict"
            resp = http.post(url, json={"instances": [row.tolist()]}, headers=AUTH)
            sent[("/v1/predict", str(resp.status_code), resp.headers.get(VERSION_HEADER))] += 1
        for _ in range(3):
            resp = http.post(endpoint.predict_url, json={"instances": [[0] * 64]})
            sent[("/v1/predict", str(resp.status_code), "none")] += 1
        for _ in range(2):
            resp = http.post(endpoint.predict_url, json={"instances": [[0] * 63]}, headers=AUTH)
            sent[
                ("/v1/predict", str(resp.status_code), resp.headers.get(VERSION_HEADER, "none"))
            ] += 1
    assert sent == {
        ("/v1/predict", "200", version): 12,
        ("/v1/predict", "401", "none"): 3,
        ("/v1/predict", "400", "none"): 2,
    }
    deadline = time.monotonic() + 30
    while True:  # the export lags by its report interval
        counted = requests_counted()
        delta = {k: counted[k] - before.get(k, 0) for k in counted}
        delta = {k: v for k, v in delta.items() if v and k[0] == "/v1/predict"}
        if delta == sent or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert delta == sent


def test_an_escalated_request_id_is_in_the_log_of_every_deployment_it_touched(
    endpoint: Endpoint, test_rows
) -> None:  # noqa: ANN001
    """The cheap tier escalates to the expensive tier itself; the request's id goes
    along, so the expensive tier's log line of the call names it too."""
    from ray._private.worker import global_worker

    x, _ = test_rows
    answers = httpx.post(
        endpoint.predict_url, json={"instances": x.tolist()}, headers=AUTH, timeout=60
    ).json()["predictions"]
    unsure = next(i for i, p in enumerate(answers) if p["tier"] == "expensive")
    request_id = f"trace-escalated-{time.time_ns()}"
    resp = httpx.post(
        endpoint.predict_url,
        json={"instances": [x[unsure].tolist()]},
        headers={**AUTH, "x-request-id": request_id},
    )
    assert resp.json()["predictions"][0]["tier"] == "expensive"
    logs = Path(global_worker.node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 10
    while True:  # replica logs are written as they come; give them a moment
        touched = {
            deployment
            for deployment in ("Ingress", "cheap-tier", "expensive-tier")
            for f in logs.glob(f"replica_*{deployment}*.log")
            if request_id in f.read_text()
        }
        if len(touched) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert touched == {"Ingress", "cheap-tier", "expensive-tier"}


def test_the_serve_config_yaml_args_build_the_graph(platform: Platform) -> None:
    """`serve deploy config.yaml` hands build_app its `args` as a plain dict."""
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from app.keys import key_sha256
    from serve_graphs.builder import build_app

    key = {"id": "ops", "scope": "admin", "sha256": key_sha256(KEY)}
    args = {
        "workload": "digits",
        "tracking_uri": platform.settings.tracking_uri,
        "api_keys": [key],
        "serve": {"batch": {"max_batch_size": 32}},
    }
    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    assert isinstance(app, Application)
    with pytest.raises(ValidationError, match="api_keys"):
        build_app({**args, "api_keys": [{**key, "sha256": "the-plain-key"}]})


def test_the_open_inference_protocol_answers_through_the_cascade(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    x, y = test_rows
    body = {
        "id": "oip-1",
        "inputs": [
            {"name": "pixels", "shape": [8, 64], "datatype": "FP32", "data": x[:8].ravel().tolist()}
        ],
    }
    base = endpoint.base_url
    assert httpx.get(f"{base}/v2/health/ready").status_code == 200
    resp = httpx.post(f"{base}/v2/models/digits/infer", json=body, headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    cascade = Registry(platform.settings.tracking_uri).resolve("digits-cascade")
    assert (out["id"], out["model_version"]) == ("oip-1", cascade.version)
    labels = next(o for o in out["outputs"] if o["name"] == "label")["data"]
    assert np.mean(np.asarray(labels) == y[:8]) >= 0.75


def register_challenger(platform: Platform) -> tuple[str, str]:
    """A second cascade version for A/B routing: a new registered version of the cheap
    tier (the same weights) whose threshold 0 lets it answer everything itself, so its
    answers are told apart by their model version."""
    import tempfile

    from app.cascade_spec import cascade_name

    registry = Registry(platform.settings.tracking_uri)
    cheap = registry.resolve("digits-cheap", platform.cascade.cheap_version)
    run_id = registry.start_run("ab-challenger", params={}, tags={"workload": "digits"})
    copy = registry.register(
        "digits-cheap", registry.download(cheap), run_id=run_id, tags={"copy_of": cheap.label}
    )
    spec = platform.cascade.model_copy(update={"cheap_version": copy.version, "threshold": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        ref = registry.register(
            cascade_name("digits"), spec.save(Path(tmp)), run_id=run_id, tags={}
        )
    registry.finish_run(run_id)
    return ref.version, copy.label


def test_ab_and_shadow_routing_set_from_the_cli_without_a_redeploy(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """`scaledl route set` changes who answers on the running service: a shadow gets
    copies and its agreement is reported; a 50/50 split sends each user to one version,
    the challenger's own model version answering (loaded by multiplexing); an explicit
    version path bypasses the table; the table is kept in the registry."""
    import json
    import os
    import subprocess
    import sys

    from ray._private.worker import global_worker

    x, _ = test_rows
    champion = Registry(platform.settings.tracking_uri).resolve("digits-cascade").version
    challenger, challenger_cheap = register_challenger(platform)
    env = {**os.environ, "SCALEDL_STORAGE_ROOT": str(platform.settings.storage_root),
           "SCALEDL_API_KEY": KEY}  # fmt: skip

    def route(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "app", "route", *argv, "--url", endpoint.base_url],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def send(user: str, i: int, url: str = endpoint.predict_url) -> dict:
        resp = httpx.post(url, json={"instances": [x[i].tolist()]},
                          headers={**AUTH, "x-scaledl-user": user}, timeout=30)  # fmt: skip
        assert resp.status_code == 200, resp.text
        return resp.json()

    routes_url = f"{endpoint.base_url}/v1/models/digits/routes"
    try:
        shown = route("set", "digits", "champion=100", "--shadow", "challenger")
        assert "challenger" in shown and "shadow" in shown
        # Setting the table starts loading the challenger's models, before any request.
        logs = Path(global_worker.node.get_logs_dir_path()) / "serve"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            f"loaded routed version {challenger_cheap}" in line
            for f in logs.glob("replica_*cheap-tier*.log")
            for line in f.open()
        ):
            time.sleep(0.5)
        assert time.monotonic() < deadline, "the challenger was not loaded ahead of traffic"
        assert {send(f"user-{i}", i)["version"] for i in range(30)} == {champion}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the copies run after the answers
            versions = httpx.get(routes_url, headers=AUTH).json()["stats"]["versions"]
            shadow = versions.get(challenger, {}).get("shadow", {})
            if shadow.get("compared") == 30:
                break
            time.sleep(0.5)
        # Counted under the shadow's version, cluster-wide (the serving-stats actor)
        assert shadow["compared"] == 30 and shadow["agreement"] >= 0.7  # same weights
        assert versions[challenger]["requests"] == 0 and versions[champion]["requests"] >= 30

        route("set", "digits", "champion=50", "challenger=50")
        answers = {f"user-{i}": send(f"user-{i}", i) for i in range(40)}
        by_version = Counter(a["version"] for a in answers.values())
        assert set(by_version) == {champion, challenger}, by_version
        for user, answer in list(answers.items())[:10]:
            assert send(user, 0)["version"] == answer["version"]  # sticky
        served = {p["model_version"] for a in answers.values() if a["version"] == challenger
                  for p in a["predictions"]}  # fmt: skip
        assert served == {challenger_cheap}
        named = f"{endpoint.base_url}/v1/models/digits/versions/{challenger}/predict"
        assert send("user-0", 0, named)["version"] == challenger
        stored = Registry(platform.settings.tracking_uri).model_tag(
            "digits-cascade", "scaledl.routes"
        )
        assert [e["weight"] for e in json.loads(stored)["routes"]] == [50, 50]
        shown = route("show", "digits")
        assert "requests" in shown and challenger in shown
    finally:
        route("clear", "digits")


def test_a_slow_expensive_tier_degrades_to_the_cheap_answer(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """Redeploys with an impossible expensive-tier deadline (only redeploying tests follow)."""
    redeploy(endpoint, platform, expensive_timeout_s=1e-4)
    x, _ = test_rows
    resp = httpx.post(
        endpoint.predict_url, json={"instances": x.tolist()}, headers=AUTH, timeout=60
    )
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    degraded = [p for p in predictions if p["degraded"]]
    assert degraded and all(p["tier"] == "cheap" for p in degraded)
    assert not any(p["tier"] == "expensive" for p in predictions)


def test_a_saturated_tier_sheds_at_once_with_a_json_503_never_a_504(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """Redeploys with one call in flight to the cheap tier and one row let wait behind
    it: a burst is answered or shed at once (503 + Retry-After, a JSON reason), never
    left to wait out the request timeout."""
    import asyncio

    redeploy(endpoint, platform, tier_calls_in_flight=1, tier_max_waiting_rows=1)
    x, _ = test_rows

    async def one(client: httpx.AsyncClient, row: np.ndarray) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        resp = await client.post(endpoint.predict_url, json={"instances": [row.tolist()]},
                                 headers=AUTH)  # fmt: skip
        return resp, time.perf_counter() - started

    async def burst() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(one(client, row) for row in x[:64]))

    answers = asyncio.run(burst())
    statuses = Counter(r.status_code for r, _ in answers)
    shed = [(r, s) for r, s in answers if r.status_code == 503]
    print(f"burst of 64 at one call in flight: {dict(statuses)}; slowest 503 "
          f"{max((s for _, s in shed), default=0) * 1000:.0f} ms")  # fmt: skip
    assert set(statuses) <= {200, 503} and shed, statuses
    assert all(r.headers["retry-after"] == "1" for r, _ in shed)
    assert any("cheap tier is at capacity" in r.json()["error"] for r, _ in shed)
    assert max(s for _, s in shed) < 5  # at once: the request timeout is 10 s


def test_overload_is_shed_with_503_and_retry_after_never_a_hang(
    endpoint: Endpoint, test_rows, platform: Platform
) -> None:  # noqa: ANN001
    """Redeploys with room for one request and one queued (keep this test last here)."""
    import asyncio

    redeploy(endpoint, platform, ingress_max_ongoing_requests=1, ingress_max_queued_requests=1)
    x, _ = test_rows

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        endpoint.predict_url, json={"instances": [row.tolist()]}, headers=AUTH
                    )
                    for row in x[:48]
                )
            )

    responses = asyncio.run(fire())  # a hang would end in httpx's timeout error
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)


def test_a_slow_body_is_cut_off_with_a_408_and_the_service_answers_meanwhile(
    endpoint: Endpoint,
) -> None:
    """Slowloris through the deployed transport (HAProxy, then the ingress replica): cut
    off at serve.body_timeout_s (10 s by default), a JSON 408, and prompt requests are
    answered while it trickles in."""
    import json
    import threading

    from tests.conftest import slowloris

    port = int(endpoint.base_url.rsplit(":", 1)[1])
    body = json.dumps({"instances": [[0] * 64]}).encode()
    answered: list[int] = []

    def prompt() -> None:
        for _ in range(3):
            time.sleep(1)
            resp = httpx.post(endpoint.predict_url, json={"instances": [[0] * 64]},
                              headers=AUTH, timeout=10)  # fmt: skip
            answered.append(resp.status_code)

    meanwhile = threading.Thread(target=prompt)
    meanwhile.start()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer, seconds = slowloris(port, "/v1/models/digits/predict", headers, body, give_up_s=30)
    meanwhile.join()
    status = answer.split(b"\r\n", 1)[0]
    print(f"slow body answered after {seconds:.1f} s: {status!r}")
    assert answered == [200, 200, 200]
    assert status == b"HTTP/1.1 408 Request Timeout", answer
    assert b"serve.body_timeout_s" in answer
