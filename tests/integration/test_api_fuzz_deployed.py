"""Schema-driven fuzzing of the *deployed* service (issue 19 §2): requests generated from
the OpenAPI spec it serves, valid and invalid, over real HTTP through Ray's proxy to the
ingress replica and the tiers, each with the admin key so that it gets past auth, on
every route the route audit enumerates from the app (admin and rollout routes too). No
answer may be a 500, 502 or 504, and every body is JSON. tests/unit/test_api_fuzz.py
fuzzes the same app in process, faster; this one is the app as users reach it.

One test drives every operation with Hypothesis itself: schemathesis' lazy loader for a
schema from a fixture (``schemathesis.pytest.from_fixture``) fails on pytest 9.2
(``'Function' object has no attribute '_nodeid'``), and the schema is only there once
the fixture has deployed the service.

Generated admin bodies can set a routing table or start a rollout: the test puts the
platform's routing and rollout state back when it ends, for the modules after it.
"""

from __future__ import annotations

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.serving import Endpoint
from tests.ray_platform import AUTH
from tests.unit.test_route_audit import OPEN, ROUTES

AUDITED = {f"{method} {path}" for method, path in {*ROUTES, *OPEN}}  # enumerated from the app
EXAMPLES_PER_OPERATION = 80
FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def test_no_generated_request_to_the_deployed_service_gets_a_500(endpoint: Endpoint) -> None:
    schema = schemathesis.openapi.from_url(f"{endpoint.base_url}/openapi.json", headers=AUTH)
    sent: Counter = Counter()  # operation -> requests
    statuses: Counter = Counter()  # (operation, status) -> answers
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            # Mostly the served model, so that cases reach its handlers, not only the
            # router's 404; some with any generated name.
            served = {p: "digits" for p in ("name", "model") if f"{{{p}}}" in operation.path}
            cases = st.one_of(
                operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                *(
                    operation.as_strategy(mode, path_parameters=served or None)
                    for mode in schemathesis.GenerationMode
                    for _ in range(2)  # twice the weight
                ),
            )

            @given(case=cases)
            @FUZZ
            def call(case) -> None:  # noqa: ANN001
                label = case.operation.label
                case.headers = {**(case.headers or {}), **AUTH}  # over generated ones too
                response = case.call(timeout=30)
                sent[label] += 1
                statuses[label, response.status_code] += 1
                assert response.status_code not in (500, 502, 504), (label, response.text)
                content_type = response.headers.get("content-type", [""])[0]
                assert content_type.startswith("application/json"), (label, response.text)

            call()
    finally:
        for method, path in (("POST", "rollout/abort"), ("DELETE", "routes")):
            resp = httpx.request(method, f"{endpoint.base_url}/v1/models/digits/{path}",
                                 headers=AUTH, timeout=30)  # fmt: skip
            assert resp.status_code in (200, 204, 404, 409), (path, resp.text)
    print(f"{sum(sent.values())} requests over {len(sent)} operations")
    for (label, status), n in sorted(statuses.items()):
        print(f"  {label}: {n} x {status}")
    assert sum(sent.values()) >= 1000, sent
    assert set(sent) == AUDITED, set(sent) ^ AUDITED
