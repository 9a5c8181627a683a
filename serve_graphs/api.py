"""The HTTP surface, free of Ray: routes, request validation, auth and error mapping.

``build_api`` returns a FastAPI app around a :class:`Cascade`; the Serve ingress hands it
to Serve, tests drive it with a TestClient.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from numbers import Real
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.exceptions import HTTPException

from app.errors import (
    DataContractError,
    GatewayTimeout,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ScaledlError,
)
from app.keys import KeyRing, Scope
from app.workloads import Workload
from data.validate import CompiledContract, check_rows, mismatch
from serve_graphs.cascade import Cascade, Instances, Prediction
from serve_graphs.observe import CostMeter, NullObserver, Observer, RequestMetrics
from serve_graphs.oip import oip_router

# Instances are checked by to_matrix / to_frame rather than by a pydantic union, whose
# errors list every branch that failed; the schema still tells clients what to send.
Instance = Annotated[
    list[Any] | dict[str, Any],
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"type": "number"},
                            {"type": "array", "items": {"type": "number"}},
                        ]
                    },
                },
                {
                    "type": "object",
                    "description": "A record (workloads of records): feature -> value.",
                },
            ]
        }
    ),
]


BearerCredentials = Annotated[
    HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[Instance] = Field(
        min_length=1,
        description="Raw inputs, one per prediction: a flat list of the model's features "
        "or a 2-D array of them (an 8x8 digits image, say), or for workloads of records "
        "(transactions) an object of feature -> value.",
        examples=[[[0, 0, 5, 13, 9, 1, 0, 0] * 8]],
    )


class PredictionOut(BaseModel):
    label: int
    confidence: float
    tier: str = Field(description="Which tier answered: cheap, or expensive after escalation.")
    model_version: str = Field(description="Registered model and version, e.g. digits-cheap/3.")
    degraded: bool = Field(
        description="True when the expensive tier should have answered but was slow or "
        "unavailable, so the cheap tier's answer stands."
    )


class PredictResponse(BaseModel):
    model: str
    predictions: list[PredictionOut]


log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1  # what 429/503 answers ask clients to wait, in seconds


def build_api(
    workload: Workload,
    cascade: Cascade,
    *,
    keys: KeyRing,
    max_instances: int,
    model_version: str | Callable[[], str],
    max_body_bytes: int = 4 * 2**20,
    request_timeout_s: float = 10.0,
    observer: Observer | None = None,
    costs: CostMeter | None = None,
) -> FastAPI:
    """The app: ``/v1`` simple JSON, ``/v2`` the Open Inference Protocol; ``model_version``
    is the served cascade's registry version (a callable, where a hot swap changes it)."""
    api = FastAPI(
        title="scaledl",
        description=f"Predictions for the {workload.name} workload: {workload.description}.",
        version="1",
    )
    check = InputCheck(workload)
    observer = observer or NullObserver()
    costs = costs or CostMeter()

    def key_for(scope: Scope):  # noqa: ANN202 - a FastAPI dependency
        async def require(credentials: BearerCredentials) -> None:
            keys.authorize(credentials.credentials if credentials else None, scope)

        return require

    async def predict_checked(instances: Instances) -> list[Prediction]:
        # pandera takes milliseconds per request of records: off the event loop.
        frame = isinstance(instances, pd.DataFrame)
        checked = await asyncio.to_thread(check, instances) if frame else check(instances)
        try:
            predictions = await asyncio.wait_for(cascade.predict(checked), request_timeout_s)
        except TimeoutError:
            raise GatewayTimeout(
                f"no answer within {request_timeout_s:g} s (serve.request_timeout_s): retry, "
                "or send fewer instances per request"
            ) from None
        observer.predictions(predictions)
        costs.predictions(predictions)
        return predictions

    @api.exception_handler(ScaledlError)
    async def _scaledl_error(_: Request, exc: ScaledlError) -> JSONResponse:
        headers = {
            401: {"WWW-Authenticate": "Bearer"},
            429: {"Retry-After": str(RETRY_AFTER_S)},
            503: {"Retry-After": str(RETRY_AFTER_S)},
        }.get(exc.status_code)
        return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=headers)

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal error; it is logged with this request's id"}, status_code=500
        )

    @api.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return JSONResponse({"error": "request body is not valid JSON"}, status_code=400)
        # The Open Inference Protocol answers every malformed request with a 400.
        status = 400 if request.url.path.startswith("/v2") else 422
        return JSONResponse({"error": _describe(errors)}, status_code=status)

    api.add_middleware(OipJsonBodies)
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    api.add_middleware(RequestMetrics, observer=observer)  # outermost: sees every answer

    @api.get("/healthz", summary="Liveness: the ingress is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        dependencies=[Depends(key_for("predict"))],
        summary="Predict one or many instances through the cascade",
    )
    async def predict(name: str, body: PredictRequest) -> PredictResponse:
        if name != workload.name:
            raise NotFound(f"unknown model {name!r}: this service serves {workload.name!r}")
        instances = (
            to_frame(body.instances, workload, max_instances)
            if workload.fitted
            else to_matrix(body.instances, len(workload.feature_columns), max_instances)
        )
        predictions = await predict_checked(instances)
        return PredictResponse(
            model=workload.name,
            predictions=[PredictionOut(**p.__dict__) for p in predictions],
        )

    @api.get(
        "/v1/models/{name}/cost",
        dependencies=[Depends(key_for("admin"))],
        summary="Live cost of serving (admin): expensive-tier share, compute per request",
        description="What this ingress replica has seen since it started: instances "
        "answered, the share the expensive tier answered, escalated and degraded shares, "
        "tier time per instance, and the estimated compute per instance and per request. "
        "With several ingress replicas, each reports its own traffic.",
    )
    async def cost(name: str) -> dict[str, float | int]:
        if name != workload.name:
            raise NotFound(f"unknown model {name!r}: this service serves {workload.name!r}")
        return costs.report()

    api.include_router(
        oip_router(
            workload,
            model_version,
            predict_checked,
            key_for=key_for,
            max_instances=max_instances,
        )
    )
    return api


class BodyLimit:
    """Pure ASGI: a body over ``max_bytes`` is a 413 before it is parsed, whether it
    announces its length or streams in chunks."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body is over {self.max_bytes:,} bytes (serve.max_body_bytes): "
            "split the request"
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:  # a chunked body: FastAPI passes HTTPExceptions on
                raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)


class OipJsonBodies:
    """Pure ASGI: POSTs under /v2 are JSON whatever their content type says (Triton's
    client sends none); Triton's binary-tensor extension is refused. Other paths pass
    through untouched, without the cost of a BaseHTTPMiddleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith("/v2/")
        ):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            if any(k == b"inference-header-content-length" for k, _ in headers):
                refusal = {"error": "binary tensor data is not supported: send JSON tensors"}
                await JSONResponse(refusal, status_code=400)(scope, receive, send)
                return
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class InputCheck:
    """The workload's contract, applied to every request: the same rules as at ingest.

    Numbers (digits) go through the compiled contract, well under a millisecond;
    records (transactions) through pandera itself, which also coerces their types.
    Either way a broken instance is a 400 naming the instance and the rule, never the
    value (it may be PII).
    """

    def __init__(self, workload: Workload) -> None:
        self.contract = workload.instance_contract()
        self.compiled = None if workload.fitted else CompiledContract(self.contract)

    def __call__(self, instances: Instances) -> Instances:
        if isinstance(instances, pd.DataFrame):
            try:
                valid, reasons = check_rows(instances, self.contract, where="request")
            except DataContractError:  # a value no rule could even be applied to
                raise InvalidRequest(
                    "instances hold values the input contract cannot check: send one "
                    "number or string per field"
                ) from None
            errors, checked = reasons.tolist(), valid
        else:
            errors, checked = self.compiled.row_errors(instances), instances
        broken = [(i, r) for i, r in enumerate(errors) if r is not None]
        if broken:
            shown = "; ".join(f"instance {i}: {r}" for i, r in broken[:5])
            raise InvalidRequest(f"instances break the input contract: {shown}")
        return checked


def _check_count(n: int, max_instances: int) -> None:
    if n > max_instances:
        raise PayloadTooLarge(
            f"{n} instances in one request; the limit is {max_instances}: split the request"
        )


def to_frame(instances: list[Instance], workload: Workload, max_instances: int) -> pd.DataFrame:
    """Record instances -> a frame of the feature columns, or a 4xx naming what is wrong."""
    _check_count(len(instances), max_instances)
    columns = list(workload.feature_columns)
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidRequest(
                f"instance {i} is not an object: send one object of {', '.join(columns)} "
                "per instance"
            )
        problem = mismatch(instance, columns, "field")
        if problem:
            raise InvalidRequest(f"instance {i}: {problem}")
        for field, value in instance.items():
            if isinstance(value, list | dict | bool):
                raise InvalidRequest(
                    f"instance {i}: field {field!r} holds a {type(value).__name__}; send one "
                    "number or string"
                )
    return pd.DataFrame.from_records(instances, columns=columns)


def to_matrix(instances: list[Instance], n_features: int, max_instances: int) -> np.ndarray:
    """Instances -> a float matrix (n, F), or a 4xx naming what is wrong."""
    _check_count(len(instances), max_instances)
    rows = []
    for i, instance in enumerate(instances):
        if isinstance(instance, dict):
            raise InvalidRequest(
                f"instance {i} is an object; this model takes {n_features} numbers per "
                "instance (a flat list, or a 2-D array of them)"
            )
        values = _flatten(instance, i)
        row = np.asarray(values, dtype=np.float64)
        if not np.isfinite(row).all():
            raise InvalidRequest(f"instance {i} holds NaN or infinity: send finite numbers")
        if row.size != n_features:
            raise InvalidRequest(
                f"instance {i} has {row.size} values; the model takes {n_features} "
                f"(a flat list, or a 2-D array of that many values)"
            )
        rows.append(row)
    return np.stack(rows)


def _flatten(instance: list[Any], i: int) -> list[float]:
    """Numbers of a flat or 2-D instance; rows of a 2-D one must be equally long."""
    nested = [isinstance(item, list) for item in instance]
    if any(nested):
        if not all(nested) or len({len(row) for row in instance}) > 1:
            raise InvalidRequest(f"instance {i} is a ragged array: its rows must be equally long")
        instance = [v for row in instance for v in row]
    return [_number(v, i) for v in instance]


def _number(value: Any, i: int) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidRequest(f"instance {i} holds {value!r}, which is not a number")
    return float(value)


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{where or 'body'}: {e['msg']}")
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more
