"""Pure ASGI middlewares of the ingress: cheap on every request, unlike BaseHTTPMiddleware."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class BodyLimit:
    """Pure ASGI: a body over ``max_bytes`` is a 413 before it is parsed, whether it
    announces its length or streams in chunks; a body still arriving ``timeout_s`` after
    the request began is a 408 (a slow sender holds a request slot no longer)."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 10.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.too_big = (
            f"the request body is over {max_bytes:,} bytes (serve.max_body_bytes): "
            "split the request"
        )
        self.too_slow = (
            f"the request body did not arrive within {timeout_s:g} s "
            "(serve.body_timeout_s): send it at once"
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"error": self.too_big}, status_code=413)(scope, receive, send)
            return
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def counted() -> dict:
            nonlocal seen, complete
            if complete:  # past the body: a wait for the disconnect, not timed
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    event = await receive()
            except TimeoutError:
                raise HTTPException(408, self.too_slow, headers={"Connection": "close"}) from None
            complete = event["type"] != "http.request" or not event.get("more_body", False)
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:  # a chunked body: FastAPI passes HTTPExceptions on
                raise HTTPException(413, self.too_big)
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
