"""The HTTP surface: Starlette routes the BentoML service mounts at '/'.

Routes are raw Starlette so the service owns every byte of input validation: BentoML's typed
inputs answer 500 for an undecodable image and fetch URLs given in a file field. Each route
checks auth, validates, calls one `ServingRuntime` method and shapes JSON; `error_response` is the
one place a ServiceError becomes an HTTP answer. BentoML serves /readyz, /livez and /metrics.
"""
from __future__ import annotations

import functools
import logging
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.auth import require_bearer
from service.errors import NotReady, PayloadTooLarge, ServiceError
from service.request_validation import parse_feedback, read_image_uploads, read_labeled_upload
from service.runtime import ServingRuntime

log = logging.getLogger("cnnloop.service")


def error_response(error: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.as_json(), status_code=error.status, headers=headers)


def _runtime(request: Request) -> ServingRuntime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is still starting")
    return runtime


def endpoint(fn: Callable[[Request, ServingRuntime], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Run a route; a ServiceError becomes its 4xx/503 JSON, anything else a logged 500 JSON."""

    @functools.wraps(fn)
    async def wrapped(request: Request) -> Response:
        runtime = getattr(request.app.state, "runtime", None)
        try:
            return await fn(request, _runtime(request))
        except ServiceError as e:
            if runtime is not None and e.status < 500:
                runtime.metrics.rejected.labels(e.code).inc()
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal_error", "message": "unexpected server error; see the service log"},
                                status_code=500)

    return wrapped


@endpoint
async def predict(request: Request, rt: ServingRuntime) -> Response:
    require_bearer(request.headers.get("authorization"), rt.settings.predict_token, "/predict")
    uploads = await read_image_uploads(request, rt.settings.max_files)
    return JSONResponse(await rt.predict(uploads))


@endpoint
async def feedback(request: Request, rt: ServingRuntime) -> Response:
    require_bearer(request.headers.get("authorization"), rt.settings.api_token, "/feedback")
    fb = parse_feedback(await request.body(), request.headers.get("content-type"))
    return JSONResponse(await rt.feedback(fb))


@endpoint
async def labeled_upload(request: Request, rt: ServingRuntime) -> Response:
    require_bearer(request.headers.get("authorization"), rt.settings.api_token, "/feedback/image")
    upload, label = await read_labeled_upload(request)
    return JSONResponse(await rt.add_labeled_upload(upload, label), status_code=201)


@endpoint
async def info(request: Request, rt: ServingRuntime) -> Response:
    return JSONResponse(rt.info())


@endpoint
async def admin_reload(request: Request, rt: ServingRuntime) -> Response:
    require_bearer(request.headers.get("authorization"), rt.settings.api_token, "/admin/reload")
    return JSONResponse((await rt.reload()).as_dict())


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over the configured limit, by Content-Length or while streaming."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if scope["type"] != "http" or runtime is None:
            return await self.app(scope, receive, send)
        limit = runtime.settings.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            runtime.metrics.rejected.labels("payload_too_large").inc()
            response = error_response(PayloadTooLarge(
                f"request body is {declared} bytes; the limit is {limit} (CNNLOOP_MAX_BODY_BYTES). "
                "Send fewer or smaller images per request."))
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (CNNLOOP_MAX_BODY_BYTES)")
            return message

        await self.app(scope, limited_receive, send)


def build_http_app() -> Starlette:
    """The routes; `app.state.runtime` is set when the service starts."""
    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/feedback/image", labeled_upload, methods=["POST"]),
            Route("/info", info, methods=["GET"]),
            Route("/admin/reload", admin_reload, methods=["POST"]),
        ],
        middleware=[Middleware(BodySizeLimit)],
    )
