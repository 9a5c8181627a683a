"""The HTTP surface, free of Ray: routes, request validation, auth and error mapping.

``build_api`` returns a FastAPI app around a :class:`Routing` (the routing table over
cascade versions); the Serve ingress hands it to Serve, tests drive it with a TestClient.
"""

from __future__ import annotations

import asyncio
import logging
from numbers import Real
from typing import Annotated, Any, TypeVar

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.exceptions import HTTPException

from app.errors import (
    DataContractError,
    GatewayTimeout,
    InvalidRequest,
    PayloadTooLarge,
    ScaledlError,
)
from app.keys import ApiKey, KeyRing, Scope
from app.workloads import Workload
from data.validate import CompiledContract, RecordFastPath, check_rows, mismatch
from serve_graphs.admin import admin_router, check_name
from serve_graphs.cascade import Instances, Prediction
from serve_graphs.middleware import BodyLimit, OipJsonBodies
from serve_graphs.observe import (
    VERSION_HEADER,
    ABMeter,
    CostMeter,
    Fanout,
    NullObserver,
    Observer,
    RequestMetrics,
)
from serve_graphs.oip import oip_router
from serve_graphs.routing import Routing

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


class KeyScope(HTTPBearer):
    """The dependency of a route that needs a key of ``scope``: OpenAPI documents it as
    the bearer scheme, and it checks the key itself, one dependency rather than a
    second one around ``HTTPBearer`` (each costs FastAPI a resolution per request)."""

    def __init__(self, keys: KeyRing, scope: Scope) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer")
        self.keys, self.needed = keys, scope

    async def __call__(self, request: Request) -> ApiKey:
        credentials = await super().__call__(request)
        return self.keys.authorize(credentials.credentials if credentials else None, self.needed)


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
    version: str = Field(
        description="The cascade version that answered (also the x-scaledl-version header)."
    )
    predictions: list[PredictionOut]


Body = TypeVar("Body", bound=BaseModel)
log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1  # what 429/503 answers ask clients to wait, in seconds


def build_api(
    workload: Workload,
    routing: Routing,
    *,
    keys: KeyRing,
    max_instances: int,
    max_body_bytes: int = 4 * 2**20,
    request_timeout_s: float = 10.0,
    route_header: str = "x-scaledl-user",
    observer: Observer | None = None,
    costs: CostMeter | None = None,
) -> FastAPI:
    """The app: ``/v1`` simple JSON, ``/v2`` the Open Inference Protocol, and the admin
    routes; ``routing`` picks the cascade version of each request (A/B, canary, shadow),
    sticky per value of the ``route_header`` request header."""
    api = FastAPI(
        title="scaledl",
        description=f"Predictions for the {workload.name} workload: {workload.description}.",
        version="1",
    )
    check = InputCheck(workload)
    costs = costs or CostMeter()
    ab = ABMeter()
    observer = Fanout(observer or NullObserver(), ab)
    routing.on_shadow = observer.shadow

    def key_for(scope: Scope) -> KeyScope:
        return KeyScope(keys, scope)

    async def predict_checked(
        instances: Instances, request: Request, named: str | None
    ) -> tuple[str, list[Prediction]]:
        """The routed version and its predictions; the version goes out in a header of
        every answer, errors included, so each version's errors count against it."""
        route = routing.choose(user=request.headers.get(route_header), named=named)
        # Records take milliseconds to check: off the event loop.
        frame = isinstance(instances, pd.DataFrame)
        checked = await asyncio.to_thread(check, instances) if frame else check(instances)
        request.state.version = version = route.version  # a 4xx above is no version's
        try:
            async with asyncio.timeout(request_timeout_s):  # no task of its own, unlike wait_for
                predictions = await routing.predict(route, checked)
        except TimeoutError:
            raise GatewayTimeout(
                f"no answer within {request_timeout_s:g} s (serve.request_timeout_s): retry, "
                "or send fewer instances per request"
            ) from None
        observer.predictions(predictions)
        costs.predictions(predictions)
        return version, predictions

    def version_header(request: Request) -> dict[str, str]:
        version = getattr(request.state, "version", None)
        return {VERSION_HEADER: version} if version else {}

    @api.exception_handler(ScaledlError)
    async def _scaledl_error(request: Request, exc: ScaledlError) -> JSONResponse:
        headers = {
            401: {"WWW-Authenticate": "Bearer"},
            429: {"Retry-After": str(RETRY_AFTER_S)},
            503: {"Retry-After": str(RETRY_AFTER_S)},
        }.get(exc.status_code, {})
        return JSONResponse(
            {"error": exc.message},
            status_code=exc.status_code,
            headers={**headers, **version_header(request)},
        )

    @api.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal error; it is logged with this request's id"},
            status_code=500,
            headers=version_header(request),
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

    async def predict(name: str, request: Request, version: str | None = None) -> JSONResponse:
        check_name(workload, name)
        body = parse_body(PredictRequest, await request.body())
        instances = (
            to_frame(body.instances, workload, max_instances)
            if workload.fitted
            else to_matrix(body.instances, len(workload.feature_columns), max_instances)
        )
        version, predictions = await predict_checked(instances, request, version)
        # Written directly: the answer is ours, so FastAPI's revalidation against
        # PredictResponse (which still documents it) would only cost time.
        answer = {
            "model": workload.name,
            "version": version,
            "predictions": [p.__dict__ for p in predictions],
        }
        return JSONResponse(answer, headers={VERSION_HEADER: version})

    for path, summary in (
        ("/v1/models/{name}/predict", "Predict one or many instances (routed: A/B, canary)"),
        (
            "/v1/models/{name}/versions/{version}/predict",
            "Predict with one named cascade version, bypassing the routing table",
        ),
    ):
        api.add_api_route(
            path,
            predict,
            methods=["POST"],
            response_model=PredictResponse,
            dependencies=[Depends(key_for("predict"))],
            summary=summary,
            openapi_extra=body_schema(PredictRequest),
        )

    api.include_router(admin_router(workload, routing, costs, ab, key_for=key_for))
    api.include_router(
        oip_router(
            workload,
            routing.versions,
            predict_checked,
            key_for=key_for,
            max_instances=max_instances,
        )
    )
    return api


class InputCheck:
    """The workload's contract, applied to every request: the same rules as at ingest.

    Numbers (digits) go through the compiled contract, well under a millisecond.
    Records (transactions) that are plainly valid take pandera's checks without its
    per-call overhead (:class:`RecordFastPath`); any other goes through pandera itself,
    which also coerces types (a number as text) and words the error. Either way a
    broken instance is a 400 naming the instance and the rule, never the value (it may
    be PII).
    """

    def __init__(self, workload: Workload) -> None:
        self.contract = workload.instance_contract()
        self.compiled = None if workload.fitted else CompiledContract(self.contract)
        self.fast = RecordFastPath(self.contract)

    def __call__(self, instances: Instances) -> Instances:
        if isinstance(instances, pd.DataFrame):
            fast = self.fast(instances)
            if fast is not None:  # plainly valid: pandera's checks, without its overhead
                return fast
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


def parse_body(model: type[Body], raw: bytes) -> Body:
    """The request body as ``model``, parsed and checked in one pass by pydantic (a
    third of FastAPI's cost for a body parameter); a bad one is FastAPI's own 4xx."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body that :func:`parse_body` reads (the route has no body parameter)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__}: inline its nested models"
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


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
    if all(type(v) is float or type(v) is int for v in instance):  # JSON numbers, flat
        return instance
    nested = [isinstance(item, list) for item in instance]
    if any(nested):
        if not all(nested) or len({len(row) for row in instance}) > 1:
            raise InvalidRequest(f"instance {i} is a ragged array: its rows must be equally long")
        instance = [v for row in instance for v in row]
        if all(type(v) is float or type(v) is int for v in instance):  # JSON numbers, 2-D
            return instance
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
