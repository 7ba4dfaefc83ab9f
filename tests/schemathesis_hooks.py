"""schemathesis hooks for tests/test_http_contract.py (loaded through SCHEMATHESIS_HOOKS).

Random bytes in a `format: binary` field are almost never an image, so left alone the fuzzer
would only ever reach the decoder's 422 and never inference, the log, or feedback on a real
prediction. Half the generated files become real PNGs (size and colour drawn from the generated
bytes, so cases stay reproducible); the other half stay as generated, to keep fuzzing the decoder. Open Inference Protocol infer bodies
get the same treatment: half become consistent requests (base64 PNGs with their shape, or pixels
that fill their shape), so the fuzzer reaches inference on /v2 too.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json

import schemathesis
from PIL import Image

_IMAGE_FIELDS = {"/predict": "images", "/feedback/image": "image"}


def _png_from(seed: bytes) -> bytes:
    digest = hashlib.sha256(seed).digest()
    side = 1 + digest[0] % 96
    image = Image.new("RGB", (side, 1 + digest[1] % 96), tuple(digest[2:5]))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _raw(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@schemathesis.hook
def map_body(context, body):
    field = _IMAGE_FIELDS.get(getattr(context.operation, "path", None))
    if not field or not isinstance(body, dict) or field not in body:
        return body
    value = body[field]
    files = value if isinstance(value, list) else [value]
    if hashlib.sha256(b"".join(_raw(v) for v in files)).digest()[0] % 2:
        return body
    images = [_png_from(_raw(v)) for v in files]
    return {**body, field: images if isinstance(value, list) else images[0]}


def _consistent_infer_input(tensor: dict, seed: bytes) -> dict:
    digest = hashlib.sha256(seed).digest()
    if tensor.get("name") == "pixels":
        h, w = 1 + digest[0] % 8, 1 + digest[1] % 8
        return {"name": "pixels", "datatype": "UINT8", "shape": [1, h, w, 3],
                "data": [digest[i % 32] for i in range(h * w * 3)]}
    count = 1 + digest[0] % 3
    files = [base64.b64encode(_png_from(seed + bytes([i]))).decode() for i in range(count)]
    return {"name": "images", "datatype": "BYTES", "shape": [count], "data": files}


@schemathesis.hook
def map_case(context, case):
    path = getattr(context.operation, "path", "") or ""
    body = case.body
    if not path.endswith("/infer") or not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return case
    seed = json.dumps(body, sort_keys=True, default=str).encode()
    inputs = [t for t in body["inputs"] if isinstance(t, dict)]
    if len(inputs) != 1 or hashlib.sha256(seed).digest()[0] % 2:
        return case
    case.body = {**body, "inputs": [_consistent_infer_input(inputs[0], seed)]}
    if case.headers:  # a JSON body: no binary part follows it
        case.headers = {k: v for k, v in case.headers.items() if k.lower() != "inference-header-content-length"}
    return case
