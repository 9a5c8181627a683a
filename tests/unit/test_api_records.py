"""Serving a workload of records (transactions) without Ray: /v1 objects and OIP v2
named tensors, checked against the same contract as at ingest, with the model's own
preprocessor turning them into features."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from app.keys import KeyRing, dev_key
from app.model_artifact import LoadedModel, ModelMeta
from app.workloads import get_workload
from data.features import fit_preprocessor
from data.generate import transactions_frame
from serve_graphs.api.app import build_api
from serve_graphs.decide.cascade import Instances
from serve_graphs.decide.routing import Routing
from serve_graphs.decide.tier import TierRunner
from tests.unit.graph import graph

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

KEY = "s3cret-key-for-unit-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
URL = "/v1/models/transactions/predict"
FRAME = transactions_frame(2000, seed=5)
TX = get_workload("transactions")
PREPROCESSOR = fit_preprocessor(
    "transactions",
    [TX.derive(FRAME)],
    numeric=TX.numeric_features,
    categorical=TX.categorical_features,
)
BOUND = get_workload("transactions", PREPROCESSOR)


class Seen:
    """A loaded model that records the rows of each forward pass it runs."""

    def __init__(self, model: LoadedModel, seen: list[Instances]) -> None:
        self.model, self.seen = model, seen

    def predict_proba(self, rows: Instances):  # noqa: ANN201
        self.seen.append(rows)
        return self.model.predict_proba(rows)


def local_tier(tier: str, seen: list[Instances]) -> TierRunner:
    torch.manual_seed(0)
    model = LoadedModel(
        BOUND.build_model(tier).eval(), ModelMeta("transactions", tier, "v0"), BOUND
    )
    return TierRunner(Seen(model, seen), f"transactions-{tier}/1")


def records_client(threshold: float, calls: dict[str, list]) -> TestClient:
    """The graph (tests/unit/graph.py) serving cascade version 2 of transactions."""
    g = graph(
        local_tier("cheap", calls["cheap"]),
        local_tier("expensive", calls["expensive"]),
        version="2",
        threshold=threshold,
    )
    routing = Routing.fixed(g.caller, "2")
    return TestClient(build_api(TX, routing, keys=KeyRing([dev_key(KEY)]), max_instances=8))


@pytest.fixture
def client_and_calls() -> tuple[TestClient, dict[str, list]]:
    calls: dict[str, list] = {"cheap": [], "expensive": []}
    return records_client(0.0, calls), calls


def records(n: int) -> list[dict]:
    rows = FRAME[list(TX.feature_columns)].head(n).copy()
    rows["ts"] = rows["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return rows.to_dict(orient="records")


def test_records_are_checked_typed_and_scored(client_and_calls) -> None:  # noqa: ANN001
    client, calls = client_and_calls
    resp = client.post(URL, json={"instances": records(3)}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert [p["tier"] for p in resp.json()["predictions"]] == ["cheap"] * 3
    sent = calls["cheap"][0]
    assert isinstance(sent, pd.DataFrame) and list(sent.columns) == list(TX.feature_columns)
    assert isinstance(sent["ts"].dtype, pd.DatetimeTZDtype)  # coerced by the contract


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amount": -3.0}, "instance 1: amount: greater_than(0)"),
        ({"merchant_category": "crypto_atm"}, "instance 1: merchant_category: isin"),
        ({"country": "usa"}, "instance 1: country: str_matches"),
        ({"ts": "yesterday"}, "instance 1: ts: coerce_dtype"),
        ({"amount": None}, "instance 1: amount: not_nullable"),
        ({"card_number": "4111111111111111"}, "instance 1: unexpected field 'card_number'"),
        ({"4111111111111111": 1}, "instance 1: unexpected field (16 characters, not shown)"),
    ],
)
def test_a_broken_record_is_a_400_naming_instance_and_rule(
    client_and_calls, change, message
) -> None:  # noqa: ANN001
    client, _ = client_and_calls
    body = records(2)
    body[1] = {**body[1], **change}
    resp = client.post(URL, json={"instances": body}, headers=AUTH)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]
    assert "4111111111111111" not in resp.text  # never echoes a value back


def test_numbers_are_refused_for_a_workload_of_records(client_and_calls) -> None:  # noqa: ANN001
    client, _ = client_and_calls
    resp = client.post(URL, json={"instances": [[1.0, 2.0]]}, headers=AUTH)
    assert resp.status_code == 400 and "is not an object" in resp.json()["error"]


def test_oip_takes_one_named_tensor_per_column(client_and_calls) -> None:  # noqa: ANN001
    client, _ = client_and_calls
    meta = client.get("/v2/models/transactions", headers=AUTH).json()
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "ts": "BYTES",
        "amount": "FP64",
        "currency": "BYTES",
        "merchant_category": "BYTES",
        "country": "BYTES",
        "device": "BYTES",
    }
    rows = records(4)
    inputs = [
        {
            "name": i["name"],
            "datatype": i["datatype"],
            "shape": [4],
            "data": [r[i["name"]] for r in rows],
        }
        for i in meta["inputs"]
    ]
    resp = client.post("/v2/models/transactions/infer", json={"inputs": inputs}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    label = next(o for o in resp.json()["outputs"] if o["name"] == "label")
    assert label["shape"] == [4] and set(label["data"]) <= {0, 1}

    short = [*inputs[:-1], {**inputs[-1], "shape": [3], "data": inputs[-1]["data"][:3]}]
    resp = client.post("/v2/models/transactions/infer", json={"inputs": short}, headers=AUTH)
    assert resp.status_code == 400 and "different numbers of instances" in resp.json()["error"]
    resp = client.post("/v2/models/transactions/infer", json={"inputs": inputs[1:]}, headers=AUTH)
    assert resp.status_code == 400 and "missing input 'ts'" in resp.json()["error"]


def test_serving_applies_the_same_features_as_training() -> None:
    """No skew: a served record and the same row read at training time give one vector."""
    served = BOUND.features(pd.DataFrame(records(5)).astype({"amount": float}))
    trained = BOUND.features(FRAME.head(5))
    np.testing.assert_allclose(served, trained, rtol=1e-6)


def test_unsure_records_escalate_as_a_frame_of_just_those_rows() -> None:
    calls: dict[str, list] = {"cheap": [], "expensive": []}
    resp = records_client(1.01, calls).post(URL, json={"instances": records(3)}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert [p["tier"] for p in resp.json()["predictions"]] == ["expensive"] * 3
    escalated = calls["expensive"][0]
    assert isinstance(escalated, pd.DataFrame) and len(escalated) == 3


def test_a_tier_batches_several_requests_frames_into_one_pass() -> None:
    torch.manual_seed(0)
    model = LoadedModel(
        BOUND.build_model("cheap").eval(), ModelMeta("transactions", "cheap", "v"), BOUND
    )
    runner = TierRunner(model, "transactions-cheap/1")
    frames = [FRAME[list(TX.feature_columns)].iloc[a:b] for a, b in ((0, 2), (2, 7), (7, 8))]
    out = runner.predict_many(frames)
    assert [len(p) for p in out] == [2, 5, 1]
    np.testing.assert_allclose(np.concatenate(out), model.predict_proba(FRAME.head(8)), rtol=1e-5)


@pytest.mark.parametrize("value", [[1, 2], {"x": 1}, True])
def test_a_field_that_is_not_one_value_is_a_400(client_and_calls, value) -> None:  # noqa: ANN001
    client, _ = client_and_calls
    body = records(1)
    body[0]["amount"] = value
    resp = client.post(URL, json={"instances": body}, headers=AUTH)
    assert resp.status_code == 400 and "field 'amount' holds" in resp.json()["error"]
    inputs = [
        {"name": k, "datatype": "FP64" if k == "amount" else "BYTES", "shape": [1], "data": [v]}
        for k, v in body[0].items()
    ]
    resp = client.post("/v2/models/transactions/infer", json={"inputs": inputs}, headers=AUTH)
    assert resp.status_code == 400, resp.text
