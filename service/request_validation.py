"""Turn raw HTTP input into validated values, or a ServiceError that says what is wrong (4xx).

Nothing here decodes pixels: `exporters.preprocess.load_model_input` is the one decoder, and the one
reader of image headers. It raises ImageDecodeError for empty, truncated, non-image, bomb and
over-the-limit files, which `service.predictions.model_input` maps to 422.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

IMAGES_FIELD = "images"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass(frozen=True, eq=False)
class PixelImage:
    """A decoded RGB image sent as a uint8 (H, W, 3) array instead of a file (the OIP `pixels` input)."""

    filename: str
    pixels: np.ndarray


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    # The pattern says in the schema what stripping enforces: some non-space character.
    prediction_id: str = Field(min_length=1, max_length=128, pattern=r"\S")
    label: str = Field(min_length=1, max_length=256, pattern=r"\S")


def _require_multipart(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"expected multipart/form-data, got '{media_type or 'no Content-Type'}'; "
            f"send images as files in the '{IMAGES_FIELD}' field (curl -F {IMAGES_FIELD}=@photo.jpg)")


async def _read_form(request: Request, max_files: int):
    from starlette.exceptions import HTTPException

    _require_multipart(request)
    try:
        # max_part_size bounds non-file fields only; file parts are bounded by BodySizeLimit.
        return await request.form(max_files=max_files, max_fields=32, max_part_size=64 * 1024)
    except PayloadTooLarge:
        raise
    except HTTPException as e:  # starlette's MultiPartException, e.g. "Too many files"
        if "Too many files" in str(e.detail):
            raise PayloadTooLarge(f"too many files: at most {max_files} per request (CNNLOOP_MAX_FILES)",
                                  code="too_many_files") from None
        raise BadRequest(f"malformed multipart body: {e.detail}", code="bad_multipart") from None
    except Exception as e:  # missing boundary, truncated body...
        raise BadRequest(f"malformed multipart body: {type(e).__name__}: {e}", code="bad_multipart") from None


async def _file_bytes(value, field: str, index: int) -> Upload:
    if not isinstance(value, UploadFile):
        raise BadRequest(f"'{field}' item {index} is a text field, not a file; send files (curl -F {field}=@photo.jpg)",
                         code="not_a_file")
    data = await value.read()
    return Upload(filename=value.filename or f"{field}[{index}]", data=data)


async def read_image_uploads(request: Request, max_files: int) -> list[Upload]:
    """The files of the multipart field `images`, in order; 4xx when missing, empty or too many."""
    form = await _read_form(request, max_files)
    try:
        values = form.getlist(IMAGES_FIELD)
        if not values:
            present = sorted(set(form.keys()))
            raise BadRequest(f"missing multipart field '{IMAGES_FIELD}' (got fields {present}); "
                             f"send one or more files as '{IMAGES_FIELD}'", code="missing_field")
        if len(values) > max_files:
            raise PayloadTooLarge(f"too many files: {len(values)}; at most {max_files} per request (CNNLOOP_MAX_FILES)",
                                  code="too_many_files")
        return [await _file_bytes(v, IMAGES_FIELD, i) for i, v in enumerate(values)]
    finally:
        await form.close()


async def read_labeled_upload(request: Request) -> tuple[Upload, str]:
    """`image` (one file) and `label` (text) of a labeled upload (POST /feedback/image)."""
    form = await _read_form(request, max_files=1)
    try:
        image, label = form.get("image"), form.get("label")
        if image is None or label is None:
            raise BadRequest("needs multipart fields 'image' (one file) and 'label' (text)", code="missing_field")
        if not isinstance(label, str) or not label.strip():
            raise BadRequest("'label' must be a non-empty text field", code="bad_label")
        return await _file_bytes(image, "image", 0), label.strip()
    finally:
        await form.close()


def parse_json(body: bytes, what: str = "body"):
    """A JSON request body, or a 400 (`malformed_json`) that says why not; `what` names it in the message."""
    try:
        return json.loads(body)
    except RecursionError:  # json recurses per nesting level: [[[[...]]]] 100k deep exhausts the stack
        raise BadRequest(f"{what} is not usable JSON: nested too deeply", code="malformed_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and ints over Python's 4300-digit limit
        raise BadRequest(f"{what} is not valid JSON: {str(e)[:200]}", code="malformed_json") from None


def parse_feedback(body: bytes, content_type: str | None) -> FeedbackIn:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"expected application/json, got '{media_type or 'no Content-Type'}'; "
                                   'send {"prediction_id": "...", "label": "..."}')
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise BadRequest(f'body must be a JSON object {{"prediction_id": ..., "label": ...}}, got {type(payload).__name__}',
                         code="malformed_json")
    try:
        return FeedbackIn.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(f"'{'.'.join(map(str, err['loc'])) or 'body'}': {err['msg']}" for err in e.errors())
        raise BadRequest(f"invalid feedback: {problems}", code="invalid_feedback") from None
