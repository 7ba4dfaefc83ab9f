"""The OpenAPI 3.1 description of every route the service answers, served at /docs.json.

BentoML's own spec only knows its typed APIs (our routes are raw Starlette, so it listed
/healthz /livez /readyz /metrics and nothing else); this one replaces it, and BentoML's Swagger
UI at / reads it. Built per request from the live settings, so what it says about auth and
limits is what this server enforces. The schemas are checked against real answers by the
schemathesis fuzz test; the feedback body's schema is the pydantic model the route validates with.
"""
from __future__ import annotations

import importlib.metadata

from service import oip_spec
from service.request_validation import IMAGES_FIELD, FeedbackIn
from service.review_spec import review_paths
from service.settings import ServiceSettings

_ERROR = {"$ref": "#/components/schemas/Error"}
_BEARER = "bearerAuth"

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable machine-readable code, e.g. bad_image, unknown_label"},
        "message": {"type": "string", "description": "what is wrong and how to fix it"},
        "detail": {"type": "object", "description": "extra fields for some codes (index/filename of a bad file...)"},
    },
}

_PREDICTION = {
    "type": "object",
    "required": ["prediction_id", "filename", "label", "confidence", "model_version", "top_k", "prediction_set",
                 "abstained"],
    "properties": {
        "prediction_id": {"type": "string", "description": "give it to POST /feedback with the true label"},
        "filename": {"type": "string"},
        "label": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "model_version": {"type": "string"},
        "top_k": {"type": "array", "items": {
            "type": "object", "required": ["label", "probability"],
            "properties": {"label": {"type": "string"}, "probability": {"type": "number", "minimum": 0, "maximum": 1}}}},
        "prediction_set": {"type": ["array", "null"], "items": {"type": "string"}, "description":
                           "the classes that together hold the true one with the bundle's coverage (default 90%), "
                           "most probable first; may be empty when the top class alone is more than enough; "
                           "null when the bundle has no calibration"},
        "abstained": {"type": "boolean", "description": "true: hand this image to a person (calibrated confidence under "
                      "the threshold, or a prediction set over the size limit); top_k and the set are still given"},
        "logged": {"type": "boolean", "const": False,
                   "description": "present (false) when the log did not take this prediction: it cannot get feedback"},
    },
}

_PREDICT_RESPONSE = {
    "type": "object", "required": ["model_version", "predictions"],
    "properties": {"model_version": {"type": "string"},
                   "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}},
}

_NULLABLE_STR = {"type": ["string", "null"]}
_FEEDBACK_RESPONSE = {
    "type": "object",
    "required": ["prediction_id", "label", "predicted_label", "previous_label", "changed", "correct"],
    "properties": {
        "prediction_id": {"type": "string"}, "label": {"type": "string"}, "predicted_label": {"type": "string"},
        "previous_label": {**_NULLABLE_STR, "description": "the label this prediction had before (null: first)"},
        "changed": {"type": "boolean", "description": "false when the prediction already had this label"},
        "correct": {"type": "boolean", "description": "the model predicted this label"},
    },
}

_LABELED_UPLOAD_RESPONSE = {
    "type": "object", "required": ["upload_id", "label", "image_sha256"],
    "properties": {"upload_id": {"type": "string"}, "label": {"type": "string"},
                   "image_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
}

_RELOAD_RESPONSE = {
    "type": "object", "required": ["outcome"],
    "properties": {"outcome": {"enum": ["unchanged", "swapped", "failed", "no_model"]},
                   "version": {"type": "string"}, "previous": {"type": "string"}, "error": {"type": "string"}},
}

_OBJECT_OR_NULL = {"type": ["object", "null"]}
_INFO_RESPONSE = {
    "type": "object",
    "required": ["ready", "model", "providers", "registry", "batching", "threads", "log", "drift", "feedback",
                 "settings", "started_at"],
    "properties": {
        "ready": {"type": "boolean"},
        "model": {**_OBJECT_OR_NULL, "description": "version, labels, input size, backbone; null until one loads"},
        "providers": {"type": "array", "items": {"type": "string"}},
        "registry": {"type": "object"}, "batching": {"type": "object"}, "threads": {"type": "object"},
        "log": _OBJECT_OR_NULL, "drift": _OBJECT_OR_NULL,
        "feedback": {"type": "object", "required": ["labeled_predictions", "correct"],
                     "properties": {"labeled_predictions": {"type": "integer"}, "correct": {"type": "integer"}}},
        "settings": {"type": "object", "description": "the effective settings, tokens left out"},
        "started_at": {"type": "number"},
    },
}


def _errors(*statuses: int) -> dict:
    why = {400: "malformed request (the message says what)", 401: "missing or wrong bearer token",
           404: "no such prediction (or, for review, never queued)", 413: "body, file count or image over a limit", 415: "wrong Content-Type",
           422: "well-formed but unusable: undecodable image, unknown label", 503: "no model loaded yet"}
    return {str(s): {"description": why[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _security(token_set: bool | None) -> list:
    """Required when the token is set; optional ([{}] first) when unknown; absent when unset."""
    if token_set is None:
        return [{}, {_BEARER: []}]
    return [{_BEARER: []}] if token_set else []


def _label_schema(labels: list[str] | None, description: str) -> dict:
    schema = {"type": "string", "minLength": 1, "description": description}
    if labels:
        schema["enum"] = list(labels)
    return schema


def _cnnloop_paths(settings: ServiceSettings | None, labels: list[str] | None) -> dict:
    predict_auth = None if settings is None else settings.predict_token is not None
    api_auth = None if settings is None else settings.api_token is not None
    max_files = None if settings is None else settings.max_files
    limits = "" if settings is None else (f" At most {settings.max_files} files and {settings.max_body_bytes} bytes "
                                          f"per request, {settings.max_pixels} pixels per image.")
    images = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
              "description": "one or more image files (JPEG, PNG, WebP, HEIC/HEIF, AVIF, BMP, GIF, TIFF)"}
    if max_files:
        images["maxItems"] = max_files
    feedback_link = {"operationId": "feedback", "description": "label the first image of this answer",
                     "requestBody": {"prediction_id": "$response.body#/predictions/0/prediction_id",
                                     "label": "$response.body#/predictions/0/label"}}
    return {
        "/predict": {"post": {
            "operationId": "predict", "tags": ["cnnloop"], "summary": "Classify images",
            "description": "Upload images as multipart field `images` (curl -F images=@photo.jpg). EXIF "
                           "orientation is applied, as a phone displays the photo." + limits,
            "security": _security(predict_auth),
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": {"type": "object", "required": [IMAGES_FIELD], "properties": {IMAGES_FIELD: images}},
                "encoding": {IMAGES_FIELD: {"contentType": "image/*, application/octet-stream"}}}}},
            "responses": {"200": {**_json(_PREDICT_RESPONSE, "one prediction per file, in order"),
                                  "links": {"GiveFeedback": feedback_link}},
                          **_errors(400, 401, 413, 415, 422, 503)},
        }},
        "/feedback": {"post": {
            "operationId": "feedback", "tags": ["cnnloop"], "summary": "Give the true label of a prediction",
            "description": "Idempotent: the latest label wins; `changed` says whether this call changed it.",
            "security": _security(api_auth),
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Feedback"}}}},
            "responses": {"200": _json(_FEEDBACK_RESPONSE, "the label now recorded"),
                          **_errors(400, 401, 404, 415, 422, 503)},
        }},
        "/feedback/image": {"post": {
            "operationId": "labeledUpload", "tags": ["cnnloop"], "summary": "Add a labeled image for retraining",
            "security": _security(api_auth),
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image", "label"],
                "properties": {"image": {"type": "string", "format": "binary"},
                               "label": _label_schema(labels, "one of the served model's classes")}},
                "encoding": {"image": {"contentType": "image/*, application/octet-stream"}}}}},
            "responses": {"201": _json(_LABELED_UPLOAD_RESPONSE, "stored"),
                          **_errors(400, 401, 413, 415, 422, 503)},
        }},
        "/info": {"get": {
            "operationId": "info", "tags": ["cnnloop"], "summary": "The model served, settings, log, drift",
            "responses": {"200": _json(_INFO_RESPONSE, "what this replica is doing"), **_errors(503)},
        }},
        "/admin/reload": {"post": {
            "operationId": "reload", "tags": ["cnnloop"], "summary": "Check the registry alias now",
            "security": _security(api_auth),
            "responses": {"200": _json(_RELOAD_RESPONSE, "what the check did"), **_errors(401, 503)},
        }},
    }


def _infra_paths() -> dict:
    def probe(operation_id: str, summary: str, failing: str | None) -> dict:
        responses = {"200": {"description": "yes", "content": {"text/plain": {"schema": {"type": "string"}}}}}
        if failing:
            responses[failing] = {"description": "no", "content": {"text/plain": {"schema": {"type": "string"}}}}
        return {"get": {"operationId": operation_id, "tags": ["infra"], "summary": summary, "responses": responses}}

    return {
        "/livez": probe("livez", "Liveness: the process answers", None),
        "/healthz": probe("healthz", "Liveness (alias of /livez)", None),
        "/readyz": probe("readyz", "Readiness: a model is loaded and warmed up", "503"),
        "/metrics": {"get": {"operationId": "metrics", "tags": ["infra"], "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }


def _oip_paths(settings: ServiceSettings | None, served_version: str | None) -> dict:
    """The /v2 routes; infer is guarded by the predict token, like /predict."""
    paths = oip_spec.paths(served_version)
    security = _security(None if settings is None else settings.predict_token is not None)
    for path, item in paths.items():
        if path.endswith("/infer"):
            item["post"]["security"] = security
    return paths


def service_version() -> str:
    """The installed cnnloop version (the spec's info.version, OIP's server metadata)."""
    try:
        return importlib.metadata.version("cnnloop")
    except importlib.metadata.PackageNotFoundError:  # a bento carries the code, not the dist-info
        return "unknown"


def build_spec(settings: ServiceSettings | None, labels: list[str] | None = None,
               feedback_labels: list[str] | None = None, served_version: str | None = None) -> dict:
    """The spec for a server with these settings (None while starting: auth shown as optional).

    `labels` are the served model's classes (what a labeled upload may carry), `feedback_labels`
    every class of every version served since start (a feedback names its prediction's classes);
    they become enums, so the Swagger UI offers them and a generated client knows them; so does
    `served_version`, the one version a /v2/models/cnnloop/versions/... path may name."""
    feedback_schema = FeedbackIn.model_json_schema()
    feedback_schema["additionalProperties"] = False
    feedback_schema["properties"]["label"] = {**feedback_schema["properties"]["label"],
                                              **_label_schema(feedback_labels, "the true class of the image")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cnnloop", "version": service_version(),
                 "description": "Image classification with feedback. `POST /predict` images, `POST /feedback` the "
                                "true label of a prediction. Also speaks the Open Inference Protocol v2 "
                                "(KServe/Triton REST) under /v2."},
        "servers": [{"url": "/"}],
        "tags": [{"name": "cnnloop", "description": "predict and feedback"},
                 {"name": "review", "description": "the review queue and its labeling page (write token)"},
                 {"name": "oip", "description": "Open Inference Protocol v2 (KServe / Triton REST)"},
                 {"name": "infra", "description": "probes and metrics"}],
        "paths": {**_cnnloop_paths(settings, labels), **review_paths(_security(None if settings is None else
                                                                              settings.api_token is not None), _errors),
                  **_oip_paths(settings, served_version), **_infra_paths()},
        "components": {
            "securitySchemes": {_BEARER: {"type": "http", "scheme": "bearer",
                                          "description": "CNNLOOP_PREDICT_TOKEN for /predict and /v2 infer, "
                                                         "CNNLOOP_API_TOKEN for feedback and admin"}},
            "schemas": {"Error": _ERROR_SCHEMA, "Prediction": _PREDICTION, "Feedback": feedback_schema,
                        **oip_spec.schemas()},
        },
    }
