"""Schema-driven fuzzing of the HTTP API: requests generated from its own OpenAPI spec
(schemathesis, on hypothesis), valid and invalid, with and without a key, against real
(untrained) models behind the cascade. No input may get a 500; every answer is JSON."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.unit.test_api import AUTH, client
from tests.unit.test_api_records import client_and_calls
from tests.unit.test_route_audit import OPEN, ROUTES
from tests.unit.test_route_audit import service as audit_service

AUDITED = {*ROUTES, *OPEN}  # every route the audit enumerates from the app

EXAMPLES_PER_OPERATION = 60
sent: Counter = Counter()
operations: set[str] = set()


def digits_app():  # noqa: ANN201
    return client(threshold=0.5).app


def transactions_app():  # noqa: ANN201
    return client_and_calls.__wrapped__()[0].app


digits = schemathesis.openapi.from_asgi("/openapi.json", digits_app())
transactions = schemathesis.openapi.from_asgi("/openapi.json", transactions_app())
# Every route the ingress serves, the admin and rollout routes included (the route
# audit's app: a routing table, a rollout controller), each case with the admin key, so
# that it gets past auth. Its readiness is a 503 by design: one routed version broke.
every_route = schemathesis.openapi.from_asgi("/openapi.json", audit_service()[0].app)

FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def _check(case, workload: str) -> None:  # noqa: ANN001
    headers = AUTH if sent[workload] % 5 else {}  # every fifth one without a key
    response = case.call(headers=headers)
    sent[workload] += 1
    case.validate_response(response, checks=[not_a_server_error])
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), response.text


@digits.parametrize()
@FUZZ
def test_no_generated_request_gets_a_500_from_digits(case) -> None:  # noqa: ANN001
    _check(case, "digits")


@transactions.parametrize()
@FUZZ
def test_no_generated_request_gets_a_500_from_transactions(case) -> None:  # noqa: ANN001
    _check(case, "transactions")


@every_route.parametrize()
@FUZZ
def test_no_generated_request_with_the_admin_key_gets_a_500_on_any_route(case) -> None:  # noqa: ANN001
    response = case.call(headers=AUTH)
    sent["every route"] += 1
    operations.add(case.operation.label)
    assert response.status_code not in (500, 502, 504), (case.operation.label, response.text)
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), response.text


def test_at_least_a_thousand_requests_were_sent() -> None:
    """Runs after the three above (pytest keeps a file's order)."""
    if not sent:
        pytest.skip("counts the requests of the fuzz tests: run them too")
    assert sum(sent.values()) >= 1000 and sent["every route"] >= 1000, sent
    assert operations == {f"{m} {p}" for m, p in AUDITED}, operations ^ {
        f"{m} {p}" for m, p in AUDITED
    }
