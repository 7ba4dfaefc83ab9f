"""The one place a ServiceError becomes an HTTP answer, in its route's shape: cnnloop's own
({"error": code, "message": ...}) or, under /v2, the Open Inference Protocol's ({"error": message, "code": code}).

Below both route modules (service/http_app.py, service/oip_routes.py): each builds its routes with
`endpoint_answering`, and a wrong method on any of them answers here too, as JSON with an Allow header.
"""
from __future__ import annotations

import functools
import logging
from typing import Awaitable, Callable, Iterable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from service import oip
from service.errors import NotReady, ServiceError
from service.runtime import ServingRuntime

log = logging.getLogger("cnnloop.service")

Answer = Callable[..., JSONResponse]


def _error_headers(error: ServiceError, headers: dict | None = None) -> dict | None:
    return {**(headers or {}), "WWW-Authenticate": "Bearer"} if error.status == 401 else headers


def error_response(error: ServiceError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.as_json(), status_code=error.status, headers=_error_headers(error, headers))


def oip_error_response(error: ServiceError, headers: dict | None = None) -> JSONResponse:
    """The same error in the Open Inference Protocol's shape, for /v2: {"error": message, "code": code}."""
    return JSONResponse(oip.error_body(error), status_code=error.status, headers=_error_headers(error, headers))


def answer_for_path(path: str) -> Answer:
    """The error shape of the routes under `path`: the protocol's under /v2, cnnloop's elsewhere."""
    return oip_error_response if path == oip.PREFIX or path.startswith(oip.PREFIX + "/") else error_response


def count_rejection(request: Request, error: ServiceError) -> None:
    runtime = getattr(request.app.state, "runtime", None) if "app" in request.scope else None
    if runtime is not None and error.status < 500:
        runtime.metrics.rejected.labels(error.code).inc()


def _runtime(request: Request) -> ServingRuntime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is still starting")
    return runtime


def endpoint_answering(answer: Answer):
    """A route decorator whose errors `answer` shapes: `error_response`, or `oip_error_response` on /v2."""

    def endpoint(fn: Callable[[Request, ServingRuntime], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Run a route; a ServiceError becomes its 4xx/503 JSON, anything else a logged 500 JSON."""

        @functools.wraps(fn)
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request, _runtime(request))
            except ServiceError as e:
                count_rejection(request, e)
                return answer(e)
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return answer(ServiceError("unexpected server error; see the service log"))

        return wrapped

    return endpoint


def method_not_allowed(request: Request, allowed: Iterable[str]) -> JSONResponse:
    """405 in the path's error shape, naming the methods the path takes (in the message and in Allow)."""
    methods = sorted(set(allowed))
    error = ServiceError(f"{request.method} is not allowed on {request.url.path}; use {' or '.join(methods)}",
                         code="method_not_allowed", status=405)
    count_rejection(request, error)
    return answer_for_path(request.url.path)(error, headers={"Allow": ", ".join(methods)})


async def answer_method_not_allowed(request: Request, exc: Exception) -> Response:
    """Starlette's handler for the 405 its router raises: left to Starlette it is plain text, which
    clients that parse every error body (tritonclient: "Parse error at offset 0") cannot read."""
    assert isinstance(exc, HTTPException)
    allow = (exc.headers or {}).get("Allow", "")
    return method_not_allowed(request, [m.strip() for m in allow.split(",") if m.strip()])
