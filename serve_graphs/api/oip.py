"""The Open Inference Protocol v2 (REST), as KServe and Triton serve it, free of Ray.

One model per workload, named after it; its versions are the calibrated cascade's
registry versions the routing table serves. ``/infer`` is routed like ``/v1`` predict
(A/B, canary, shadow); ``/versions/{v}/infer`` bypasses the table.

For a workload of numbers the input is one tensor ``[n, F]`` (or any shape ``[n, ...]``
whose trailing dimensions hold F values, e.g. ``[n, 8, 8]``); for a workload of records
it is one ``[n]`` tensor per feature column (``BYTES`` for text and times,
``FP64``/``INT64`` for numbers), as Triton takes a table. The outputs are ``label``,
``confidence``, ``tier``, ``model_version`` and ``degraded``, one entry per instance.
Errors are ``400 {"error": ...}`` as the spec asks (404 for an unknown model or version).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.workloads import Workload
from data.validate import mismatch
from serve_graphs.api.admin import check_name
from serve_graphs.api.observe import VERSION_HEADER
from serve_graphs.decide.cascade import Instances, Prediction
from serve_graphs.decide.routing import version_of

NUMERIC = {
    "BOOL": None,  # named so its refusal can say why
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int] = Field(description="Dimensions; the first is the number of instances.")
    datatype: str = Field(description="FP32, FP64, INT64, … (any numeric type is accepted).")
    data: list[Any] = Field(description="The values, flat in row-major order or nested.")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[Tensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


OUTPUTS = {
    "label": "INT64",
    "confidence": "FP32",
    "tier": "BYTES",
    "model_version": "BYTES",
    "degraded": "BOOL",
}

# (instances, request, explicit version or None) -> the version that answered, its answer
Predict = Callable[[Instances, Request, str | None], Awaitable[tuple[str, list[Prediction]]]]


def oip_router(
    workload: Workload,
    versions: Callable[[], list[str]],
    predict: Predict,
    *,
    key_for: Callable[[str], Any],
    max_instances: int,
    not_ready: Callable[..., str | None] = lambda versions, public=False: None,
) -> APIRouter:
    """The /v2 routes; ``predict`` takes a checked (n, F) matrix; ``key_for(scope)`` is
    the auth dependency; ``not_ready(versions)`` says why those versions cannot be
    answered now (None: they can)."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
    n_features = len(workload.feature_columns)
    input_name = workload.input_name
    name = workload.name
    columns = record_inputs(workload) if workload.fitted else None
    inputs = (
        [{"name": c, "datatype": t, "shape": [-1]} for c, t in columns.items()]
        if columns
        else [{"name": input_name, "datatype": "FP32", "shape": [-1, n_features]}]
    )

    def check_model(model: str, version: str | None) -> str | None:
        """The version named (``7`` or ``v7``: ``"7"``), or None; a 404 if not served."""
        check_name(workload, model)
        if version is None:
            return None
        bare = version_of(version) or version
        if bare not in versions():
            raise NotFound(
                f"model {name!r} has no version {version!r} here; it serves {', '.join(versions())}"
            )
        return bare

    def answer_ready(why: str | None, body: dict[str, Any]) -> JSONResponse:
        if why is None:
            return JSONResponse({**body, "ready": True})
        headers = {"Retry-After": "1"}
        return JSONResponse({**body, "ready": False, "error": why}, 503, headers=headers)

    @router.get("/health/live", summary="Liveness (no key needed)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get(
        "/health/ready",
        summary="Readiness (no key needed): 503 with the reason while a served version "
        "cannot be answered",
    )
    async def ready() -> JSONResponse:
        return answer_ready(not_ready(versions(), public=True), {})

    @router.get("", dependencies=[Depends(key_for("predict"))], summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "scaledl", "version": "1", "extensions": []}

    def metadata(model: str, version: str | None = None) -> dict[str, Any]:
        check_model(model, version)
        return {
            "name": name,
            "versions": versions(),
            "platform": "scaledl-cascade",
            "inputs": inputs,
            "outputs": [{"name": o, "datatype": t, "shape": [-1]} for o, t in OUTPUTS.items()],
        }

    async def readiness(model: str, version: str | None = None) -> JSONResponse:
        bare = check_model(model, version)
        wanted = [bare] if bare else versions()
        return answer_ready(not_ready(wanted, public=bare is None), {"name": name})

    async def infer(
        body: InferRequest,
        model: str,
        request: Request,
        response: Response,
        version: str | None = None,
    ) -> InferResponse:
        version = check_model(model, version)
        instances = (
            _input_frame(body.inputs, columns, max_instances)
            if columns
            else _input_matrix(body.inputs, input_name, n_features, max_instances)
        )
        wanted = [o.name for o in body.outputs] if body.outputs else list(OUTPUTS)
        unknown = [o for o in wanted if o not in OUTPUTS]
        if unknown:
            raise InvalidRequest(
                f"unknown output {unknown[0]!r}: this model has {', '.join(OUTPUTS)}"
            )
        served, predictions = await predict(instances, request, version)
        response.headers[VERSION_HEADER] = served
        return InferResponse(
            model_name=name,
            model_version=served,
            id=body.id,
            outputs=[
                OutputTensor(
                    name=o,
                    shape=[len(predictions)],
                    datatype=OUTPUTS[o],
                    data=[getattr(p, o) for p in predictions],
                )
                for o in wanted
            ],
        )

    auth = [Depends(key_for("predict"))]
    for path in ("/models/{model}", "/models/{model}/versions/{version}"):
        router.add_api_route(path, metadata, methods=["GET"], dependencies=auth)
        # Which versions serve is for key holders: a version's readiness needs a key.
        keyed = auth if "{version}" in path else []
        router.add_api_route(f"{path}/ready", readiness, methods=["GET"], dependencies=keyed)
        router.add_api_route(
            f"{path}/infer",
            infer,
            methods=["POST"],
            dependencies=auth,
            response_model=InferResponse,
            response_model_exclude_none=True,
        )
    return router


_FLOAT64_MAX = np.finfo(np.float64).max


def record_inputs(workload: Workload) -> dict[str, str]:
    """Feature column -> the OIP datatype a client sends it as."""
    contract = workload.instance_contract()
    out = {}
    for column in workload.feature_columns:
        dtype = str(contract.columns[column].dtype)
        out[column] = "FP64" if "float" in dtype else "INT64" if "int" in dtype else "BYTES"
    return out


def _input_frame(inputs: list[Tensor], columns: dict[str, str], max_instances: int) -> pd.DataFrame:
    """One ``[n]`` tensor per feature column -> a frame, or a 4xx naming what is wrong."""
    names = [t.name for t in inputs]
    problem = mismatch(names, columns, "input")
    if problem:
        raise InvalidRequest(f"{problem} (send one [n] tensor for each of {', '.join(columns)})")
    data, lengths = {}, set()
    for tensor in inputs:
        where = f"input {tensor.name!r}"
        if tensor.datatype != columns[tensor.name] and not (
            columns[tensor.name] != "BYTES" and NUMERIC.get(tensor.datatype) is not None
        ):
            raise InvalidRequest(
                f"{where}: datatype {tensor.datatype!r}; send {columns[tensor.name]}"
            )
        if len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ([], [1]):
            raise InvalidRequest(f"{where}: shape {tensor.shape}; send [n] (or [n, 1])")
        values = [v for item in tensor.data for v in (item if isinstance(item, list) else [item])]
        if any(isinstance(v, list | dict | bool) for v in values):
            raise InvalidRequest(f"{where}: data must hold one number or string per instance")
        if any(isinstance(v, int) and abs(v) > _FLOAT64_MAX for v in values):
            raise InvalidRequest(f"{where}: data holds a number too large for a float64")
        if len(values) != tensor.shape[0]:
            raise InvalidRequest(
                f"{where}: shape {tensor.shape} needs {tensor.shape[0]} values, data holds "
                f"{len(values)}"
            )
        data[tensor.name] = values
        lengths.add(len(values))
    if len(lengths) > 1:
        raise InvalidRequest(f"inputs hold different numbers of instances: {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise InvalidRequest("the inputs hold no instances; send at least one")
    if n > max_instances:
        raise PayloadTooLarge(
            f"{n} instances in one request; the limit is {max_instances}: split the request"
        )
    return pd.DataFrame({c: data[c] for c in columns})


def _input_matrix(
    inputs: list[Tensor], input_name: str, n_features: int, max_instances: int
) -> np.ndarray:
    """The one input tensor as a float matrix (n, F), or a 4xx naming what is wrong."""
    if len(inputs) != 1 or inputs[0].name != input_name:
        names = ", ".join(repr(t.name) for t in inputs)
        raise InvalidRequest(f"expected one input named {input_name!r}, got {names}")
    tensor = inputs[0]
    where = f"input {tensor.name!r}"
    dtype = NUMERIC.get(tensor.datatype)
    if dtype is None:
        raise InvalidRequest(
            f"{where}: datatype {tensor.datatype!r} is not numeric; send FP32 (or another "
            f"of {', '.join(k for k, v in NUMERIC.items() if v is not None)})"
        )
    shape = tensor.shape
    if shape and shape[0] == 0:
        raise InvalidRequest(f"{where}: shape {shape} holds no instances; send at least one")
    if len(shape) < 2 or any(d < 1 for d in shape) or math.prod(shape[1:]) != n_features:
        raise InvalidRequest(
            f"{where}: shape {shape} does not hold {n_features} values per instance; "
            f"send [n, {n_features}] (or [n, ...] with {n_features} values per instance)"
        )
    if shape[0] > max_instances:
        raise PayloadTooLarge(
            f"{where}: {shape[0]} instances in one request; the limit is {max_instances}: "
            "split the request"
        )
    values = np.asarray(_numbers(tensor.data, where), dtype=np.float64)
    if values.size != math.prod(shape):
        raise InvalidRequest(
            f"{where}: shape {shape} needs {math.prod(shape)} values, data holds {values.size}"
        )
    if not np.isfinite(values).all():
        raise InvalidRequest(f"{where}: data holds NaN or infinity: send finite numbers")
    if np.issubdtype(dtype, np.integer) and not np.array_equal(values, np.round(values)):
        raise InvalidRequest(f"{where}: datatype {tensor.datatype} but data holds fractions")
    return values.reshape(shape[0], n_features)


def _numbers(data: list[Any], where: str) -> list[float]:
    """The values of flat or nested ``data`` in row-major order; anything that is not a
    number (a string, a bool, null) is a 400, as on /v1."""
    out: list[float] = []
    todo: list[Any] = [data]
    while todo:
        item = todo.pop()
        if isinstance(item, list):
            todo.extend(reversed(item))
        elif isinstance(item, Real) and not isinstance(item, bool):
            try:
                out.append(float(item))
            except OverflowError:  # a JSON integer past float64's range
                raise InvalidRequest(
                    f"{where}: data holds a number too large for a float64"
                ) from None
        else:
            raise InvalidRequest(f"{where}: data holds {item!r}, which is not a number")
    return out
