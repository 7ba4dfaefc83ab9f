"""An Open Inference Protocol v2 infer request's bytes -> the images it carries, or the 4xx ServiceError
that says what to send instead. Pure: bytes in, values out.

BYTES in JSON are strings, so a file there is base64 (tritonclient's binary_data=False cannot send
raw image bytes: it UTF-8-decodes each element). The binary tensor data extension is the normal
path: the body is the JSON, then the input's `binary_data_size` bytes, the JSON's length in the
Inference-Header-Content-Length header; BYTES elements there are a 4-byte little-endian length + bytes.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct

import numpy as np

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.oip import DATATYPES, FILES, HEADER_LENGTH, OUTPUTS, PIXELS, InferRequest, RequestedOutput
from service.request_validation import PixelImage, Upload, parse_json

_INPUTS_HELP = f"'{FILES}' (BYTES [N], one encoded image file each) or '{PIXELS}' (UINT8 [N,H,W,3], RGB)"
_MEDIA_TYPES = ("", "application/json", "application/octet-stream")


def _bad(message: str, code: str = "invalid_inference_request") -> BadRequest:
    return BadRequest(message, code=code)


def check_media_type(content_type: str | None, content_encoding: str | None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in _MEDIA_TYPES:
        raise UnsupportedMediaType(f"expected application/json (or application/octet-stream with the binary tensor "
                                   f"data extension), got '{media_type}'")
    if (content_encoding or "identity").strip().lower() != "identity":
        raise UnsupportedMediaType(f"Content-Encoding '{content_encoding}' is not supported; send the body uncompressed",
                                   code="unsupported_content_encoding")


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """(the JSON part, the binary part) of a body; without the header the whole body is JSON."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    if not re.fullmatch(r"\s*[0-9]{1,18}\s*", header_length):
        raise _bad(f"{HEADER_LENGTH} must be the byte length of the JSON part, got '{header_length[:40]}'",
                   "bad_binary_data")
    n = int(header_length)
    if n > len(view):
        raise _bad(f"{HEADER_LENGTH} is {n} but the body has only {len(view)} bytes", "bad_binary_data")
    return view[:n], view[n:]


def _json_object(raw: memoryview, whole_body: bool) -> dict:
    try:
        payload = parse_json(bytes(raw), "the inference request")
    except BadRequest as e:
        if whole_body and "JSON: Extra data" in e.message:
            e.message += f" (binary tensor data after the JSON needs the {HEADER_LENGTH} header)"
        raise
    if not isinstance(payload, dict):
        raise _bad(f'the inference request must be a JSON object {{"inputs": [...]}}, got {_json_type(payload)}',
                   "malformed_json")
    return payload


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _the_input(payload: dict, max_files: int) -> tuple[dict, str, list[int]]:
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"'inputs' must be a non-empty list; send one input: {_INPUTS_HELP}")
    if len(inputs) != 1:
        raise _bad(f"got {len(inputs)} inputs; send exactly one: {_INPUTS_HELP}")
    tensor = _object(inputs[0], "inputs[0]")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or name not in DATATYPES:
        raise _bad(f"unknown input {json.dumps(name)[:80]}; this model takes {_INPUTS_HELP}", "unknown_input")
    if datatype != DATATYPES[name]:
        other = PIXELS if name == FILES else FILES
        raise _bad(f"input '{name}' must be {DATATYPES[name]}, got {json.dumps(datatype)[:40]}; "
                   f"{DATATYPES[other]} data goes in input '{other}'", "wrong_datatype")
    rank = 1 if name == FILES else 4
    if not isinstance(shape, list) or len(shape) != rank or not all(_is_int(d) and d >= 0 for d in shape):
        expected = "[N]" if name == FILES else "[N, H, W, 3]"
        raise _bad(f"input '{name}' must have shape {expected}, got {json.dumps(shape)[:80]}", "shape_mismatch")
    if name == PIXELS and (shape[3] != 3 or shape[1] < 1 or shape[2] < 1):
        raise _bad(f"input '{PIXELS}' must have shape [N, H, W, 3] (RGB, H and W at least 1), got {shape}",
                   "shape_mismatch")
    if shape[0] < 1:
        raise _bad(f"input '{name}' holds no images (shape {shape}); send at least one", "shape_mismatch")
    if shape[0] > max_files:
        raise PayloadTooLarge(f"too many images: {shape[0]}; at most {max_files} per request (CNNLOOP_MAX_FILES)",
                              code="too_many_files")
    return tensor, name, shape


def _binary_part(tensor: dict, name: str, binary: memoryview) -> memoryview | None:
    """This input's bytes from the binary part, or None when it carries JSON `data`."""
    params = _object(tensor.get("parameters", {}), f"parameters of input '{name}'")
    if any(k.startswith("shared_memory") for k in params):
        raise _bad("shared memory inputs are not supported over HTTP here; send the data in the request")
    if "binary_data_size" not in params:
        if len(binary):
            raise _bad(f"the body has {len(binary)} bytes after the JSON but input '{name}' declares no "
                       "parameters.binary_data_size", "data_size_mismatch")
        if "data" not in tensor:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        return None
    size = params["binary_data_size"]
    if "data" in tensor:
        raise _bad(f"input '{name}' has both 'data' and parameters.binary_data_size; send one")
    if not _is_int(size) or size < 0:
        raise _bad(f"parameters.binary_data_size of input '{name}' must be a byte count, got {json.dumps(size)[:40]}",
                   "bad_binary_data")
    if size != len(binary):
        raise _bad(f"input '{name}' declares binary_data_size {size} but {len(binary)} bytes follow the JSON "
                   f"(the {HEADER_LENGTH} header gives the JSON's length)", "data_size_mismatch")
    return binary


def _length_prefixed(raw: memoryview, count: int) -> list[bytes]:
    items, pos = [], 0
    while pos < len(raw):
        if len(items) == count:
            raise _bad(f"input '{FILES}' has shape [{count}] but its binary data holds more elements", "shape_mismatch")
        if len(raw) - pos < 4:
            raise _bad(f"element {len(items)} of input '{FILES}': truncated 4-byte length", "bad_binary_data")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if n > len(raw) - pos:
            raise _bad(f"element {len(items)} of input '{FILES}' declares {n} bytes but only {len(raw) - pos} remain",
                       "bad_binary_data")
        items.append(bytes(raw[pos:pos + n]))
        pos += n
    if len(items) != count:
        raise _bad(f"input '{FILES}' has shape [{count}] but its binary data holds {len(items)} elements",
                   "shape_mismatch")
    return items


def _base64_files(data, count: int) -> list[bytes]:
    if not isinstance(data, list) or len(data) != count:
        got = f"{len(data)} elements" if isinstance(data, list) else _json_type(data)
        raise _bad(f"'data' of input '{FILES}' must be a list of {count} base64 strings (its shape), got {got}",
                   "shape_mismatch")
    files = []
    for i, item in enumerate(data):
        try:
            if not isinstance(item, str):
                raise TypeError
            files.append(base64.b64decode(item, validate=True))
        except (TypeError, binascii.Error, ValueError):
            raise _bad(f"element {i} of input '{FILES}' is not a base64 string: in JSON each BYTES element carries "
                       "one image file base64-encoded (or send binary data: tritonclient binary_data=True)",
                       "bad_base64") from None
    return files


def _json_pixels(data, shape: list[int]) -> np.ndarray:
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, RecursionError):  # ragged nesting
        raise _bad(f"'data' of input '{PIXELS}' must be a flat or nested list shaped {shape}", "shape_mismatch") from None
    if array.dtype.kind not in "iu" and array.size:
        raise _bad(f"'data' of input '{PIXELS}' must hold integers 0..255 (UINT8)", "wrong_datatype")
    if array.size != math.prod(shape) or (array.ndim > 1 and list(array.shape) != shape):
        raise _bad(f"'data' of input '{PIXELS}' has {array.size} values shaped {list(array.shape)}; shape {shape} "
                   f"needs {math.prod(shape)}", "data_size_mismatch")
    if array.min() < 0 or array.max() > 255:
        raise _bad(f"'data' of input '{PIXELS}' must hold integers 0..255 (UINT8)", "wrong_datatype")
    return array.astype(np.uint8).reshape(shape)


def _binary_pixels(raw: memoryview, shape: list[int]) -> np.ndarray:
    if len(raw) != math.prod(shape):
        raise _bad(f"input '{PIXELS}' has shape {shape} = {math.prod(shape)} bytes but {len(raw)} were sent",
                   "data_size_mismatch")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _requested_outputs(payload: dict) -> tuple[RequestedOutput, ...]:
    default = _object(payload.get("parameters", {}), "'parameters'").get("binary_data_output", False)
    if not isinstance(default, bool):
        raise _bad("parameters.binary_data_output must be true or false")
    outputs = payload.get("outputs", [])
    if outputs == []:
        return tuple(RequestedOutput(name, default) for name in OUTPUTS)
    if not isinstance(outputs, list):
        raise _bad(f"'outputs' must be a list of {{\"name\": ...}} objects, one of {list(OUTPUTS)}")
    chosen: dict[str, RequestedOutput] = {}
    for i, out in enumerate(outputs):
        name = _object(out, f"outputs[{i}]").get("name")
        if name not in OUTPUTS:
            raise _bad(f"unknown output {json.dumps(name)[:80]}; this model answers {list(OUTPUTS)}", "unknown_output")
        if name in chosen:
            raise _bad(f"output '{name}' is requested twice", "unknown_output")
        params = _object(out.get("parameters", {}), f"parameters of output '{name}'")
        if "classification" in params or any(k.startswith("shared_memory") for k in params):
            raise _bad(f"output '{name}': the classification and shared memory extensions are not supported; "
                       "'label' and 'probabilities' carry the classes")
        binary = params.get("binary_data", default)
        if not isinstance(binary, bool):
            raise _bad(f"parameters.binary_data of output '{name}' must be true or false")
        chosen[name] = RequestedOutput(name, binary)
    return tuple(chosen.values())


def parse_infer_request(body: bytes, header_length: str | None, max_files: int) -> InferRequest:
    """An infer request body (JSON, or JSON + binary tensor data) as images, requested outputs and id."""
    json_part, binary = split_body(body, header_length)
    payload = _json_object(json_part, whole_body=header_length is None)
    request_id = payload.get("id")
    if "id" in payload and not isinstance(request_id, str):
        raise _bad(f"'id' must be a string, got {_json_type(request_id)}")
    tensor, name, shape = _the_input(payload, max_files)
    outputs = _requested_outputs(payload)
    raw = _binary_part(tensor, name, binary)
    if name == FILES:
        files = _base64_files(tensor["data"], shape[0]) if raw is None else _length_prefixed(raw, shape[0])
        images = [Upload(f"{FILES}[{i}]", data) for i, data in enumerate(files)]
    else:
        pixels = _json_pixels(tensor["data"], shape) if raw is None else _binary_pixels(raw, shape)
        images = [PixelImage(f"{PIXELS}[{i}]", p) for i, p in enumerate(pixels)]
    return InferRequest(images, outputs, request_id)
