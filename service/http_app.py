"""The HTTP surface: Starlette routes the BentoML service mounts at '/'.

Routes are raw Starlette so the service owns every byte of input validation: BentoML's typed
inputs answer 500 for an undecodable image and fetch URLs given in a file field. Each route
checks auth, validates, calls one `ServingRuntime` method and shapes JSON; service/error_responses.py
is the one place a ServiceError (or a wrong method) becomes an HTTP answer, in cnnloop's shape here
and the Open Inference Protocol's under /v2 (service/oip_routes.py). BentoML serves /readyz, /livez
and /metrics.
"""
from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.auth import require_bearer
from service.error_responses import answer_for_path, answer_method_not_allowed, endpoint_answering, error_response
from service.errors import PayloadTooLarge
from service.oip_routes import oip_routes
from service.review_routes import review_routes
from service.openapi import build_spec
from service.request_validation import parse_feedback, read_image_uploads, read_labeled_upload
from service.runtime import ServingRuntime

endpoint = endpoint_answering(error_response)


@endpoint
async def predict(request: Request, rt: ServingRuntime) -> Response:
    require_bearer(request.headers.get("authorization"), rt.settings.predict_token, "/predict")
    uploads = await read_image_uploads(request, rt.settings.max_files)
    body = await rt.predict(uploads)
    clock = rt.cpu.clock()
    response = JSONResponse(body)
    clock.lap("loop.json_encode")
    return response


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
            response = answer_for_path(scope["path"])(PayloadTooLarge(
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
            # Shadows BentoML's /docs.json (which knows none of these routes); its Swagger UI at / reads this.
            Route("/docs.json", openapi_spec, methods=["GET"]),
            *review_routes(),
            *oip_routes(),
        ],
        middleware=[Middleware(BodySizeLimit)],
        exception_handlers={405: answer_method_not_allowed},
    )
