"""OpenAPI fragments for the Open Inference Protocol v2 routes (service/oip_routes.py), merged by service/openapi.py.

Every status a /v2 route answers is listed with its body schema; errors are `OipError`, the
protocol's `{"error": message}` plus cnnloop's code. Plain JSON Schema that reads the same under
OpenAPI 3.0 and 3.1 (no `nullable`, no type lists) except `const` and `prefixItems` in the input
schemas, which 3.1 (what service/openapi.py serves) reads. Security is added by openapi.py (infer needs the
predict token when one is set).
"""
from __future__ import annotations

from service import oip

_ERROR = {"$ref": "#/components/schemas/OipError"}
_WHY = {400: "malformed request: JSON, datatype, shape, data size, binary layout (the message says what)",
        401: "missing or wrong bearer token (the predict token, as for /predict)",
        404: f"unknown model (this server serves '{oip.MODEL_NAME}'), or a version that is not the one served",
        413: "body over CNNLOOP_MAX_BODY_BYTES, or more images than CNNLOOP_MAX_FILES",
        415: "a Content-Type other than application/json or application/octet-stream, or a compressed body",
        422: "well-formed but unusable: an undecodable image file, an image over CNNLOOP_MAX_PIXELS",
        503: "no model loaded yet"}

# An enum, not a free string: it is the truth, and it lets a fuzzer past the 404 into the infer parser.
_NAME = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string", "enum": [oip.MODEL_NAME]},
         "description": f"the one model this server serves: '{oip.MODEL_NAME}' (any other name is 404)"}
_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "the registry version being served (GET /v2/models/cnnloop lists it)"}
_HEADER_LENGTH = {"name": oip.HEADER_LENGTH, "in": "header", "required": False,
                  "schema": {"type": "integer", "minimum": 0},
                  "description": "binary tensor data extension: the length of the JSON part; the tensors' bytes follow it"}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": _WHY[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


def _with_unroutable_404(responses: dict) -> dict:
    """BentoML's outer router (a Mount at '/', regex '.*') never hands on a path with a newline in it:
    such a model name or version gets BentoML's plain-text 404, not ours."""
    out = dict(responses)
    out["404"] = {"description": _WHY[404] + "; a name with a newline in it gets BentoML's plain-text 404",
                  "content": {"application/json": {"schema": _ERROR}, "text/plain": {"schema": {"type": "string"}}}}
    return out


def _ok(schema_name: str, description: str) -> dict:
    return {"200": {"description": description,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}}


def _get(operation_id: str, summary: str, ok: dict, *errors: int, params: list | None = None) -> dict:
    op = {"operationId": operation_id, "tags": ["oip"], "summary": summary, "responses": {**ok, **_errors(*errors)}}
    if params:
        op["parameters"] = params
        op["responses"] = _with_unroutable_404(op["responses"])
    return {"get": op}


_INFER_DESCRIPTION = (
    f"One input, either `{oip.FILES}` (BYTES [N]: each element one encoded image file, JPEG/PNG/...) or "
    f"`{oip.PIXELS}` (UINT8 [N,H,W,3]: decoded RGB). In JSON, BYTES elements are base64 strings and UINT8 data "
    "is a flat or nested list of 0..255. With the binary tensor data extension the body is the JSON request, "
    f"then each input's bytes (its `parameters.binary_data_size`), and the `{oip.HEADER_LENGTH}` header gives "
    "the JSON's length; BYTES elements there are each a 4-byte little-endian length and the file's bytes. "
    f"Outputs: {', '.join(oip.OUTPUTS)} (give `prediction_id` to POST /feedback). An output is answered in "
    "binary when its `parameters.binary_data` is true (or, by default, when the request's "
    f"`parameters.binary_data_output` is); the answer then carries `{oip.HEADER_LENGTH}` and the bytes after the JSON.")


def _infer(operation_id: str, params: list) -> dict:
    request_schema = {"$ref": "#/components/schemas/OipInferRequest"}
    binary = {"type": "string", "format": "binary",
              "description": f"the JSON request, then the inputs' binary data; needs the {oip.HEADER_LENGTH} header"}
    return {"post": {
        "operationId": operation_id, "tags": ["oip"], "summary": "Classify images (Open Inference Protocol v2)",
        "description": _INFER_DESCRIPTION,
        "parameters": [*params, _HEADER_LENGTH],
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema},
                                                      "application/octet-stream": {"schema": binary}}},
        "responses": {
            "200": {"description": f"the outputs asked for; binary ones after the JSON ({oip.HEADER_LENGTH} header)",
                    "headers": {oip.HEADER_LENGTH: {"schema": {"type": "integer", "minimum": 0},
                                                    "description": "present when binary outputs follow the JSON"}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OipInferResponse"}},
                                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            **_with_unroutable_404(_errors(400, 401, 404, 413, 415, 422, 503))},
    }}


def _version_param(served: str | None) -> dict:
    if served is None:
        return _VERSION
    return {**_VERSION, "schema": {"type": "string", "enum": [served]}}


def paths(served_version: str | None = None) -> dict:
    """The /v2 paths; `served_version` (when a model is loaded) is the one version a path may name."""
    model, version = [_NAME], [_NAME, _version_param(served_version)]
    base, versioned = f"{oip.PREFIX}/models/{{model_name}}", f"{oip.PREFIX}/models/{{model_name}}/versions/{{model_version}}"
    return {
        oip.PREFIX: _get("oipServerMetadata", "Server metadata", _ok("OipServerMetadata", "name, version, extensions"), 503),
        f"{oip.PREFIX}/health/live": _get("oipServerLive", "Liveness", _ok("OipLive", "the server answers"), 503),
        f"{oip.PREFIX}/health/ready": _get("oipServerReady", "Readiness: a model is loaded",
                                           _ok("OipReady", "ready to infer"), 503),
        base: _get("oipModelMetadata", "Model metadata", _ok("OipModelMetadata", "inputs, outputs, versions"),
                   404, 503, params=model),
        f"{base}/ready": _get("oipModelReady", "Model readiness", _ok("OipModelReady", "the model is loaded"),
                              404, 503, params=model),
        versioned: _get("oipModelVersionMetadata", "Model metadata of a version",
                        _ok("OipModelMetadata", "inputs, outputs, versions"), 404, 503, params=version),
        f"{versioned}/ready": _get("oipModelVersionReady", "Readiness of a model version",
                                   _ok("OipModelReady", "that version is loaded"), 404, 503, params=version),
        f"{base}/infer": _infer("oipInfer", model),
        f"{versioned}/infer": _infer("oipInferVersion", version),
    }


_SHAPE = {"type": "array", "items": {"type": "integer"}}
_TENSOR_METADATA = {"type": "object", "required": ["name", "datatype", "shape"],
                    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                   "shape": {**_SHAPE, "description": "-1: any size"}}}


_DIM = {"type": "integer", "minimum": 1}


def _nested_uint8(depth: int) -> dict:
    """Lists of 0..255 nested up to `depth` deep, spelt out: a recursive schema ({"items": {}} or a
    $ref to itself) makes schemathesis build recursive strategies, which crashed its generator."""
    element: dict = {"type": "integer", "minimum": 0, "maximum": 255}
    for _ in range(depth - 1):
        element = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 255}, {"type": "array", "items": element}]}
    return {"type": "array", "items": element}


def _input(name: str, datatype: str, shape: dict, data: dict) -> dict:
    return {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"const": name}, "datatype": {"const": datatype}, "shape": shape,
        "parameters": {"type": "object", "properties": {"binary_data_size": {
            "type": "integer", "minimum": 0, "description": "this input's bytes follow the JSON (no 'data' then)"}}},
        "data": data}}


def schemas() -> dict:
    tensor_ref = {"$ref": "#/components/schemas/OipTensorMetadata"}
    return {
        "OipError": {"type": "object", "required": ["error", "code"], "properties": {
            "error": {"type": "string", "description": "what is wrong and how to fix it (tritonclient shows this)"},
            "code": {"type": "string", "description": "cnnloop's stable code, e.g. bad_image, shape_mismatch"},
            "detail": {"type": "object", "description": "extra fields for some codes (index/filename of a bad image)"}}},
        "OipServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "OipLive": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "OipReady": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "OipModelReady": {"type": "object", "required": ["name", "ready"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "ready": {"type": "boolean"}}},
        "OipTensorMetadata": _TENSOR_METADATA,
        "OipModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                             "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": tensor_ref,
                       "description": "alternatives: a request carries exactly one of them"},
            "outputs": {"type": "array", "items": tensor_ref},
            "parameters": {"type": "object", "properties": {
                "labels": {"type": "array", "items": {"type": "string"},
                           "description": "the class of each column of `probabilities`"}}}}},
        "OipInferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string", "description": "echoed in the answer"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"oneOf": [
                {"$ref": "#/components/schemas/OipFilesInput"}, {"$ref": "#/components/schemas/OipPixelsInput"}]}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "enum": list(oip.OUTPUTS)},
                "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}}}},
        "OipFilesInput": _input(oip.FILES, "BYTES", {"type": "array", "minItems": 1, "maxItems": 1, "items": _DIM,
                                                     "description": "[N]"},
                                {"type": "array", "items": {"type": "string", "format": "byte"},
                                 "description": "one base64-encoded image file per element"}),
        "OipPixelsInput": _input(oip.PIXELS, "UINT8", {"type": "array", "prefixItems": [_DIM, _DIM, _DIM, {"const": 3}],
                                                       "minItems": 4, "maxItems": 4, "description": "[N, H, W, 3]"},
                                 {**_nested_uint8(4), "description": "N*H*W*3 integers 0..255, flat or nested as the shape"}),
        "OipInferResponse": {"type": "object", "required": ["model_name", "model_version", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {"logged": {
                "type": "boolean", "description": "false: the log did not take these predictions; no feedback on them"},
                "calibrated": {"type": "boolean", "description": "false: the bundle has no calibration; probabilities "
                               "are raw and prediction_set holds every class"}}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"],
                                                   "properties": {
                "name": {"type": "string"}, "datatype": {"type": "string"}, "shape": _SHAPE,
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
                "data": {"type": "array", "items": {}}}}}}},
    }
