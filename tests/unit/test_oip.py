"""The Open Inference Protocol v2 routes, without Ray: TestClient for the error paths,
and Triton's own HTTP client over real HTTP (uvicorn) for compatibility."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.keys import KeyRing, create_key, read_keys_file
from tests.conftest import free_port
from tests.unit.graph import Graph
from tests.unit.test_api import AUTH, KEY, TestClient, api_for, digit_images, digits_graph

INFER = "/v2/models/digits/infer"


def cascade() -> Graph:
    return digits_graph(0.5)


@pytest.fixture(scope="module")
def api() -> TestClient:
    return TestClient(api_for(cascade()))


def tensor(data: list, shape: list[int], datatype: str = "FP32", name: str = "pixels") -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def test_health_routes_need_no_key_and_the_rest_do(api: TestClient) -> None:
    assert api.get("/v2/health/live").status_code == 200
    assert api.get("/v2/health/ready").status_code == 200
    assert api.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    for path in ("/v2", "/v2/models/digits", "/v2/models/digits/versions/3"):
        assert api.get(path).status_code == 401
        assert api.get(path, headers=AUTH).status_code == 200
    assert api.post(INFER, json=tensor([0] * 64, [1, 64])).status_code == 401


def test_metadata_describes_the_input_and_outputs(api: TestClient) -> None:
    meta = api.get("/v2/models/digits", headers=AUTH).json()
    assert meta["versions"] == ["3"]
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    names = [o["name"] for o in meta["outputs"]]
    assert names == ["label", "confidence", "tier", "model_version", "degraded"]


def test_infer_answers_flat_and_image_shaped_tensors_with_the_request_id(api: TestClient) -> None:
    images = digit_images(2)
    flat = np.asarray(images).reshape(-1).tolist()
    v1 = api.post("/v1/models/digits/predict", json={"instances": images}, headers=AUTH).json()
    expected = {k: [p[k] for p in v1["predictions"]] for k in ("label", "tier", "confidence")}
    for body in (tensor(flat, [2, 64]), tensor(images, [2, 8, 8], "INT64")):
        resp = api.post(INFER, json={**body, "id": "req-7"}, headers=AUTH)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert (out["model_name"], out["model_version"], out["id"]) == ("digits", "3", "req-7")
        by_name = {o["name"]: o for o in out["outputs"]}
        assert by_name["label"]["shape"] == [2] and by_name["label"]["datatype"] == "INT64"
        # Both tensor layouts are the same two images: the same answers as /v1.
        assert {k: by_name[k]["data"] for k in expected} == expected
    only = api.post(
        "/v2/models/digits/versions/3/infer",
        json={**tensor(flat, [2, 64]), "outputs": [{"name": "label"}]},
        headers=AUTH,
    ).json()
    assert [o["name"] for o in only["outputs"]] == ["label"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (tensor([0] * 64, [1, 64], name="image"), 400, "expected one input named 'pixels'"),
        (tensor([0] * 64, [1, 64], "BYTES"), 400, "datatype 'BYTES' is not numeric"),
        (tensor([0] * 60, [1, 60]), 400, "does not hold 64 values per instance"),
        (tensor([0] * 60, [1, 64]), 400, "needs 64 values, data holds 60"),
        (tensor([0.5] * 64, [1, 64], "INT32"), 400, "holds fractions"),
        (tensor(["a"] * 64, [1, 64]), 400, "holds 'a', which is not a number"),
        (tensor(["1"] * 64, [1, 64]), 400, "holds '1', which is not a number"),
        (tensor([True] * 64, [1, 64], "BOOL"), 400, "datatype 'BOOL' is not numeric"),
        (tensor([True] * 64, [1, 64]), 400, "holds True, which is not a number"),
        (tensor([None] * 64, [1, 64]), 400, "holds None, which is not a number"),
        (tensor([], [0, 64]), 400, "holds no instances"),
        (tensor([0] * 64 * 9, [9, 64]), 413, "the limit is 8"),
        (tensor([99] * 64, [1, 64]), 400, "px_00: in_range(0, 16)"),
        ({"inputs": "nope"}, 400, "inputs"),
        ({**tensor([0] * 64, [1, 64]), "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ],
)
def test_bad_infer_requests_get_the_protocols_error(
    api: TestClient, body: dict, status: int, message: str
) -> None:
    resp = api.post(INFER, json=body, headers=AUTH)
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"} and message in resp.json()["error"]


@pytest.mark.parametrize(
    "path", ["/v2/models/cats", "/v2/models/digits/versions/9", "/v2/models/cats/ready"]
)
def test_unknown_models_and_versions_are_404(api: TestClient, path: str) -> None:
    assert api.get(path, headers=AUTH).status_code == 404


def test_only_the_keys_in_the_keys_file_may_infer(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    _, secret = create_key(path, "predict", "app")
    api = TestClient(api_for(cascade(), keys=KeyRing(read_keys_file(path))))
    body = tensor([0] * 64, [1, 64])
    assert api.post(INFER, json=body, headers={"Authorization": f"Bearer {secret}"}).is_success
    assert api.post(INFER, json=body, headers=AUTH).status_code == 401  # not in this file


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """The same app on a real socket, so an unmodified OIP client can talk to it."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(api_for(cascade()), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_tritons_http_client_works_unchanged(http_server: str) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=http_server)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.is_server_live()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits", headers=headers)
    assert meta["inputs"][0]["name"] == "pixels"
    images = np.asarray(digit_images(4), dtype=np.float32).reshape(4, 64)
    pixels = triton.InferInput("pixels", [4, 64], "FP32")
    pixels.set_data_from_numpy(images, binary_data=False)
    wanted = [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "tier")]
    result = client.infer("digits", [pixels], outputs=wanted, headers=headers)
    assert result.as_numpy("label").shape == (4,)
    assert set(result.as_numpy("tier").tolist()) <= {b"cheap", b"expensive", "cheap", "expensive"}
    with pytest.raises(triton.InferenceServerException, match="not recognised"):
        client.infer("digits", [pixels], headers={"Authorization": "Bearer wrong"})


def test_binary_tensors_are_refused_with_a_400(api: TestClient) -> None:
    headers = {**AUTH, "Inference-Header-Content-Length": "120"}
    resp = api.post(INFER, content=b"{}" + b"\x00" * 256, headers=headers)
    assert resp.status_code == 400 and "send JSON tensors" in resp.json()["error"]
