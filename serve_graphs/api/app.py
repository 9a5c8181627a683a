"""The HTTP surface, free of Ray: routes, auth and error mapping. What a /v1 body
becomes (parsed, shaped, checked against the contract) is :mod:`serve_graphs.api.inputs`.

``build_api`` returns a FastAPI app around a :class:`Routing` (the routing table over
cascade versions); the Serve ingress hands it to Serve, tests drive it with a TestClient.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pandas as pd
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from app.errors import GatewayTimeout, Overloaded, ScaledlError
from app.keys import ApiKey, KeyRing, Scope
from app.sections import Fault
from app.workloads import Workload
from serve_graphs.api.admin import admin_router, check_name
from serve_graphs.api.inputs import (
    InputCheck,
    PredictRequest,
    body_schema,
    parse_body,
    to_frame,
    to_matrix,
)
from serve_graphs.api.limits import RateLimiter
from serve_graphs.api.middleware import BodyLimit, OipJsonBodies
from serve_graphs.api.observe import (
    CLIENT_CLOSED,
    VERSION_HEADER,
    AccessLog,
    CostMeter,
    Fanout,
    LiveStats,
    NullObserver,
    Observer,
    RequestMetrics,
    answered_by,
)
from serve_graphs.api.oip import oip_router
from serve_graphs.api.rollouts import RolloutsPort, rollout_router
from serve_graphs.decide.cascade import Instances, Prediction
from serve_graphs.decide.faults import inject
from serve_graphs.decide.readiness import Readiness
from serve_graphs.decide.routing import Routing


class KeyScope(HTTPBearer):
    """The dependency of a route that needs a key of ``scope``: OpenAPI documents it as
    the bearer scheme, and it checks the key and its rate limit itself, one dependency
    rather than a second one around ``HTTPBearer`` (each costs FastAPI a resolution per
    request)."""

    def __init__(self, keys: KeyRing, scope: Scope, limits: RateLimiter) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer")
        self.keys, self.needed, self.limits = keys, scope, limits

    async def __call__(self, request: Request) -> ApiKey:
        credentials = await super().__call__(request)
        key = self.keys.authorize(credentials.credentials if credentials else None, self.needed)
        self.limits.check(key, self.needed)
        return key


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


log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1  # what 429/503 answers ask clients to wait, in seconds


def build_api(
    workload: Workload,
    routing: Routing,
    *,
    keys: KeyRing,
    max_instances: int,
    limits: RateLimiter | None = None,
    readiness: Readiness | None = None,
    max_body_bytes: int = 4 * 2**20,
    body_timeout_s: float = 10.0,
    request_timeout_s: float = 10.0,
    route_header: str = "x-scaledl-user",
    observer: Observer | None = None,
    live: LiveStats | None = None,
    faults: Callable[[], dict[str, Fault]] = dict,
    rollouts: RolloutsPort | None = None,
) -> FastAPI:
    """The app: ``/v1`` simple JSON, ``/v2`` the Open Inference Protocol, and the admin
    routes; ``routing`` picks the cascade version of each request (A/B, canary, shadow),
    sticky per value of the ``route_header`` request header. The routing's cascade
    caller feeds the cost report and the observer (degraded answers, shadow copies).
    ``limits``: per-key rate limits (none by default); ``readiness``: what the ready
    routes say (always ready without one); ``live``: the live statistics the routes view
    reports (none: ops.live_stats is off); ``faults``: serve.faults now (dev and tests);
    ``rollouts``: the rollout controller the rollout routes drive (none: no such routes)."""
    api = FastAPI(
        title="scaledl",
        description=f"Predictions for the {workload.name} workload: {workload.description}.",
        version="1",
    )
    check = InputCheck(workload)
    costs = CostMeter()
    observer = Fanout(observer or NullObserver(), *([live] if live else []))
    limits = limits or RateLimiter({})
    routing.on_shadow = observer.shadow
    routing.on_shadow_dropped = observer.shadow_dropped
    routing.cascade.on_degraded = observer.degraded
    routing.cascade.on_tier_call = costs.tier_call

    def key_for(scope: Scope) -> KeyScope:
        return KeyScope(keys, scope, limits)

    def not_ready(versions: list[str], public: bool = False) -> str | None:
        """Why these versions cannot be answered now, or None; ``public``: for a route
        without a key, which must not name the versions."""
        if readiness is None:
            return None
        return readiness.reason(versions, routing.deployed(), public=public)

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
                await inject(faults().get(version), version)
                predictions = await routing.predict(route, checked)
        except TimeoutError:
            raise GatewayTimeout(
                f"no answer within {request_timeout_s:g} s (serve.request_timeout_s): retry, "
                "or send fewer instances per request"
            ) from None
        observer.predictions(version, predictions)
        costs.predictions(predictions)
        request.state.tier, request.state.degraded = answered_by(predictions)
        return version, predictions

    def version_header(request: Request) -> dict[str, str]:
        version = getattr(request.state, "version", None)
        return {VERSION_HEADER: version} if version else {}

    @api.exception_handler(ScaledlError)
    async def _scaledl_error(request: Request, exc: ScaledlError) -> JSONResponse:
        retry_after = str(getattr(exc, "retry_after_s", RETRY_AFTER_S))
        request.state.shed = isinstance(exc, Overloaded)  # a 503 not shed: a tier failed
        headers = {
            401: {"WWW-Authenticate": "Bearer"},
            429: {"Retry-After": retry_after},
            503: {"Retry-After": retry_after},
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

    @api.exception_handler(ClientDisconnect)
    async def _client_left(_: Request, __: ClientDisconnect) -> Response:
        # The client hung up before its body was in: nobody reads this answer, and no
        # server error happened. Counted and logged as the client's (499), not as a 500.
        return Response(status_code=CLIENT_CLOSED)

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
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    # Outermost: sees every answer.
    api.add_middleware(RequestMetrics, observer=observer, access_log=AccessLog(workload.name))

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

    api.include_router(admin_router(workload, routing, costs, live, key_for=key_for))
    if rollouts is not None:
        api.include_router(rollout_router(workload, rollouts, routing.deployed, key_for=key_for))
    api.include_router(
        oip_router(
            workload,
            routing.versions,
            predict_checked,
            key_for=key_for,
            max_instances=max_instances,
            not_ready=not_ready,
        )
    )
    return api


def _describe(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{where or 'body'}: {e['msg']}")
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more
