"""The review queue's routes: the labeling page at GET /review and its JSON calls under /review/.

The page itself is public (it holds no data, and asks for the token); every call that reads or
writes the queue takes the write token (CNNLOOP_API_TOKEN), like /feedback.
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from service.auth import require_bearer
from service.error_responses import endpoint_answering, error_response
from service.errors import NotReady
from service.review_desk import AnswerIn, NextIn, UndoIn, parse_body
from service.runtime import ServingRuntime

endpoint = endpoint_answering(error_response)
PAGE = Path(__file__).with_name("review_page.html")


def _desk(request: Request, rt: ServingRuntime, path: str):
    require_bearer(request.headers.get("authorization"), rt.settings.api_token, path)
    if rt.review is None:
        raise NotReady("the service is still opening its log; retry in a moment")
    return rt.review


async def review_page(request: Request) -> Response:
    # Read per request: a few KB, and an edited page shows without a restart.
    return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})


@endpoint
async def review_next(request: Request, rt: ServingRuntime) -> Response:
    desk = _desk(request, rt, "/review/next")
    body = parse_body(NextIn, await request.body(), request.headers.get("content-type"), allow_empty=True)
    return JSONResponse(await desk.next(body))


@endpoint
async def review_answer(request: Request, rt: ServingRuntime) -> Response:
    desk = _desk(request, rt, "/review/answer")
    return JSONResponse(await desk.answer(parse_body(AnswerIn, await request.body(), request.headers.get("content-type"))))


@endpoint
async def review_undo(request: Request, rt: ServingRuntime) -> Response:
    desk = _desk(request, rt, "/review/undo")
    return JSONResponse(await desk.undo(parse_body(UndoIn, await request.body(), request.headers.get("content-type"))))


@endpoint
async def review_state(request: Request, rt: ServingRuntime) -> Response:
    return JSONResponse(await _desk(request, rt, "/review/state").state())


@endpoint
async def review_image(request: Request, rt: ServingRuntime) -> Response:
    desk = _desk(request, rt, "/review/image")
    data, media_type = await desk.image(request.path_params["prediction_id"], request.query_params.get("lease_id"))
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})


def review_routes() -> list[Route]:
    return [
        Route("/review", review_page, methods=["GET"]),
        Route("/review/next", review_next, methods=["POST"]),
        Route("/review/answer", review_answer, methods=["POST"]),
        Route("/review/undo", review_undo, methods=["POST"]),
        Route("/review/state", review_state, methods=["GET"]),
        Route("/review/image/{prediction_id}", review_image, methods=["GET"]),
    ]
