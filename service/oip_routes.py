"""The Open Inference Protocol v2 routes (KServe / Triton REST) under /v2, beside cnnloop's own.

Thin like the /predict route: auth (the predict token, as /predict), then `service.oip` parses the
body, `ServingRuntime.classify` runs the very path /predict runs (decode pool, batcher, log records,
metrics, drift), and `service.oip` encodes the answer. Errors answer in the protocol's shape
(`error_responses.oip_error_response`). Not-ready answers 503 as /readyz and /predict do (the protocol
asks for "a 4xx"; clients test for 200). Unknown /v2 paths answer an OIP 404, wrong methods an OIP 405.
"""
from __future__ import annotations

import functools

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from service import oip, oip_request
from service.auth import require_bearer
from service.error_responses import count_rejection, endpoint_answering, method_not_allowed, oip_error_response
from service.errors import NotFound
from service.model_session import LoadedModel
from service.openapi import service_version
from service.runtime import ServingRuntime

oip_endpoint = endpoint_answering(oip_error_response)
NOT_SERVED = "oip_not_served"  # the catch-all route's name: it has no path of its own in the spec

# A JSON part this large (UINT8 pixels as JSON lists) is parsed off the event loop: a 32 MB body takes
# about a second of json.loads + numpy. Binary requests carry a JSON part of a few hundred bytes.
_PARSE_INLINE_BYTES = 256 * 1024


def _served(request: Request, rt: ServingRuntime) -> LoadedModel:
    """The model a /v2/models/{name}[/versions/{version}] path names, or 404 (503 while none is loaded)."""
    name = request.path_params["model_name"]
    if name != oip.MODEL_NAME:
        raise NotFound(f"unknown model '{name}'; this server serves one model, '{oip.MODEL_NAME}'",
                       code="unknown_model")
    model = rt.serving_model()
    version = request.path_params.get("model_version")
    if version is not None and version != model.version:
        raise NotFound(f"model '{oip.MODEL_NAME}' version '{version}' is not being served; the served version is "
                       f"'{model.version}' (or leave the version out)", code="unknown_model_version")
    return model


@oip_endpoint
async def server_metadata(request: Request, rt: ServingRuntime) -> Response:
    return JSONResponse(oip.server_metadata(service_version()))


@oip_endpoint
async def server_live(request: Request, rt: ServingRuntime) -> Response:
    return JSONResponse({"live": True})


@oip_endpoint
async def server_ready(request: Request, rt: ServingRuntime) -> Response:
    rt.serving_model()  # NotReady (503) until a model is loaded
    return JSONResponse({"ready": True})


@oip_endpoint
async def model_metadata(request: Request, rt: ServingRuntime) -> Response:
    model = _served(request, rt)
    return JSONResponse(oip.model_metadata(model.version, model.labels))


@oip_endpoint
async def model_ready(request: Request, rt: ServingRuntime) -> Response:
    model = _served(request, rt)
    return JSONResponse({"name": oip.MODEL_NAME, "version": model.version, "ready": True})


@oip_endpoint
async def infer(request: Request, rt: ServingRuntime) -> Response:
    require_bearer(request.headers.get("authorization"), rt.settings.predict_token, request.url.path)
    model = _served(request, rt)
    oip_request.check_media_type(request.headers.get("content-type"), request.headers.get("content-encoding"))
    body = await request.body()
    parse = functools.partial(oip_request.parse_infer_request, body, request.headers.get(oip.HEADER_LENGTH),
                              rt.settings.max_files)
    if len(body) <= _PARSE_INLINE_BYTES:
        clock = rt.cpu.clock()
        parsed = parse()
        clock.lap("loop.oip_parse")
    else:
        parsed = await run_in_threadpool(parse)
    classified = await rt.classify(parsed.images, model)
    clock = rt.cpu.clock()
    answer, header_length = oip.encode_infer_response(parsed, classified)
    clock.lap("loop.oip_encode")
    if header_length is None:
        return Response(answer, media_type="application/json")
    return Response(answer, media_type="application/octet-stream", headers={oip.HEADER_LENGTH: str(header_length)})


def _routes() -> list[Route]:
    model, version = f"{oip.PREFIX}/models/{{model_name}}", f"{oip.PREFIX}/models/{{model_name}}/versions/{{model_version}}"
    return [
        Route(oip.PREFIX, server_metadata, methods=["GET"]),
        Route(f"{oip.PREFIX}/health/live", server_live, methods=["GET"]),
        Route(f"{oip.PREFIX}/health/ready", server_ready, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(f"{model}/ready", model_ready, methods=["GET"]),
        Route(f"{model}/infer", infer, methods=["POST"]),
        Route(version, model_metadata, methods=["GET"]),
        Route(f"{version}/ready", model_ready, methods=["GET"]),
        Route(f"{version}/infer", infer, methods=["POST"]),
    ]


class _NotServed:
    """Answers every /v2 request no route takes: 405 naming the methods when a route has the path, else 404.

    An ASGI app, not a function, so that its route takes every method: Starlette gives a function
    endpoint GET alone, and then a POST to a path no route has (tritonclient's POST
    /v2/repository/index) fell through to Starlette's plain-text 405 for the catch-all's GET."""

    def __init__(self, routes: list[Route]):
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        allowed = {m for r in self.routes if r.matches(scope)[0] == Match.PARTIAL for m in r.methods}
        if allowed:
            response = method_not_allowed(request, allowed)
        else:
            error = NotFound(
                f"no route {request.method} {request.url.path}; this server implements the Open Inference Protocol's "
                f"health, metadata and infer routes for model '{oip.MODEL_NAME}' (binary_tensor_data extension only)",
                code="no_such_route")
            count_rejection(request, error)
            response = oip_error_response(error)
        await response(scope, receive, send)


def oip_routes() -> list[Route]:
    """The /v2 routes, then one that answers every other /v2 request in the protocol's error shape."""
    routes = _routes()
    # Needed under BentoML: its mount hands a path to this app only when one of its routes matches.
    return [*routes, Route(f"{oip.PREFIX}/{{rest:path}}", _NotServed(routes), name=NOT_SERVED)]
