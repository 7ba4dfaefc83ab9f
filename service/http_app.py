"""The HTTP surface: Starlette routes the BentoML service mounts at '/'.

Routes are raw Starlette so the service owns every byte of input validation: BentoML's typed
inputs answer 500 for an undecodable image and fetch URLs given in a file field. Each route
checks auth, validates, calls one `ServingRuntime` method and shapes JSON; `error_response` (and
`oip_error_response` for the /v2 routes, service/oip_routes.py) is the one place a ServiceError
becomes an HTTP answer. BentoML serves /readyz, /livez and /metrics.
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

from service import oip
from service.auth import require_bearer
from service.errors import NotReady, PayloadTooLarge, ServiceError
from service.openapi import build_spec
from service.request_validation import parse_feedback, read_image_uploads, read_labeled_upload
from service.runtime import ServingRuntime

log = logging.getLogger("cnnloop.service")


def _error_headers(error: ServiceError, headers: dict | None = None) -> dict | None:
    return {**(headers or {}), "WWW-Authenticate": "Bearer"} if error.status == 401 else headers


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.as_json(), status_code=error.status, headers=_error_headers(error))


def oip_error_response(error: ServiceError, headers: dict | None = None) -> JSONResponse:
    """The same error in the Open Inference Protocol's shape, for /v2: {"error": message, "code": code}."""
    return JSONResponse(oip.error_body(error), status_code=error.status, headers=_error_headers(error, headers))


def _runtime(request: Request) -> ServingRuntime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the service is still starting")
    return runtime


def endpoint_answering(answer: Callable[[ServiceError], Response]):
    """A route decorator whose errors `answer` shapes: `error_response`, or `oip_error_response` on /v2."""

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
                return answer(e)
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return answer(ServiceError("unexpected server error; see the service log"))

        return wrapped

    return endpoint


endpoint = endpoint_answering(error_response)


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


async def openapi_spec(request: Request) -> Response:
    # Answers while the service is still starting too: the spec then shows auth as optional.
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return JSONResponse(build_spec(None))
    model = runtime.models.current
    return JSONResponse(build_spec(runtime.settings, model.labels if model else None, runtime.known_labels(),
                                   model.version if model else None))


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
            answer = oip_error_response if scope["path"].startswith(oip.PREFIX) else error_response
            response = answer(PayloadTooLarge(
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
    from service.oip_routes import oip_routes  # here: it builds on this module's endpoint_answering

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/feedback/image", labeled_upload, methods=["POST"]),
            Route("/info", info, methods=["GET"]),
            Route("/admin/reload", admin_reload, methods=["POST"]),
            # Shadows BentoML's /docs.json (which knows none of these routes); its Swagger UI at / reads this.
            Route("/docs.json", openapi_spec, methods=["GET"]),
            *oip_routes(),
        ],
        middleware=[Middleware(BodySizeLimit)],
    )
