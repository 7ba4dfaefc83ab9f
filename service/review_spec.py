"""The OpenAPI description of the review queue's routes (service/review_routes.py)."""
from __future__ import annotations

from service.review_desk import AnswerIn, NextIn, UndoIn

_STATE = {"type": "object", "required": ["waiting", "leased", "labeled", "skipped", "expired_leases"], "properties": {
    "waiting": {"type": "integer", "description": "items free to hand out"},
    "leased": {"type": "integer", "description": "items a reviewer holds now"},
    "labeled": {"type": "integer"}, "skipped": {"type": "integer"},
    "expired_leases": {"type": "integer", "description": "items whose lease ran out unanswered (back in the queue)"},
    "strategy": {"type": "string"}, "lease_seconds": {"type": "number"}}}

_ITEM = {"type": "object", "required": ["prediction_id", "image_url", "predicted_label", "top_k"], "properties": {
    "prediction_id": {"type": "string"}, "filename": {"type": "string"}, "model_version": {"type": "string"},
    "image_url": {"type": "string", "description": "GET it with the same token (the lease is in the URL)"},
    "predicted_label": {"type": "string"}, "confidence": {"type": "number"},
    "top_k": {"type": "array", "items": {"type": "object", "properties": {
        "label": {"type": "string"}, "probability": {"type": "number"}}}},
    "reason": {"type": ["string", "null"], "description": "abstained, label_check (sent back for a second look) or null"},
    "strategy": {"type": "string"}, "answered_label": {"type": ["string", "null"]}}}


def _body(model) -> dict:
    schema = model.model_json_schema()
    schema["additionalProperties"] = False
    if model is AnswerIn:  # what its validator enforces, said in the schema: a label, or skip, never both
        schema["oneOf"] = [
            {"required": ["label"], "properties": {"label": {"type": "string"}, "skip": {"const": False}}},
            {"required": ["skip"], "properties": {"skip": {"const": True}, "label": {"type": "null"}}}]
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def review_paths(security: list, errors) -> dict:
    """`security` the write token's requirement, `errors(*statuses)` the shared error responses."""
    def ok(schema: dict, description: str) -> dict:
        return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}

    conflict = {"409": {"description": "the lease does not hold this item, expired, or already answered it",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}
    return {
        "/review": {"get": {"operationId": "reviewPage", "tags": ["review"], "summary": "The labeling page (HTML)",
                            "responses": {"200": {"description": "the page; it asks for the token",
                                                  "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/review/next": {"post": {
            "operationId": "reviewNext", "tags": ["review"], "summary": "Lease the next items to label",
            "description": "Items are the most useful unlabeled predictions (abstained first, then the acquisition "
                           "strategy), spread over the embedding space, held by this reviewer until the lease expires.",
            "security": security,
            "requestBody": {**_body(NextIn), "required": False},
            "responses": {**ok({"type": "object", "required": ["lease_id", "items", "labels", "state"], "properties": {
                "lease_id": {"type": ["string", "null"]}, "lease_expires": {"type": ["number", "null"]},
                "labels": {"type": "array", "items": {"type": "string"}},
                "items": {"type": "array", "items": _ITEM}, "state": _STATE}}, "the leased items (maybe none)"),
                **errors(400, 401, 415, 503)}}},
        "/review/answer": {"post": {
            "operationId": "reviewAnswer", "tags": ["review"], "summary": "Label (or skip) one leased item",
            "description": "The label goes through the same feedback path as POST /feedback (source review).",
            "security": security, "requestBody": _body(AnswerIn),
            "responses": {**ok({"type": "object", "required": ["prediction_id", "outcome", "state"], "properties": {
                "prediction_id": {"type": "string"}, "outcome": {"enum": ["labeled", "skipped"]},
                "label": {"type": ["string", "null"]}, "predicted_label": {"type": "string"},
                "changed": {"type": "boolean"}, "state": _STATE}}, "recorded"),
                **errors(400, 401, 404, 415, 422, 503), **conflict}}},
        "/review/undo": {"post": {
            "operationId": "reviewUndo", "tags": ["review"], "summary": "Reopen the item this lease answered",
            "security": security, "requestBody": _body(UndoIn),
            "responses": {**ok({"type": "object", "required": ["item", "state"], "properties": {
                "item": _ITEM, "lease_expires": {"type": "number"}, "state": _STATE}}, "the item, to answer again"),
                **errors(400, 401, 404, 415, 503), **conflict}}},
        "/review/state": {"get": {
            "operationId": "reviewState", "tags": ["review"], "summary": "How many items wait, are held, were answered",
            "security": security, "responses": {**ok(_STATE, "the queue"), **errors(401, 503)}}},
        "/review/image/{prediction_id}": {"get": {
            "operationId": "reviewImage", "tags": ["review"], "summary": "The stored image of a leased item",
            "security": security,
            "parameters": [{"name": "prediction_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "lease_id", "in": "query", "required": True,
                            "schema": {"type": "string", "minLength": 1, "pattern": "\\S"}}],
            "responses": {"200": {"description": "the image as uploaded",
                                  "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
                          **errors(400, 401, 503), **conflict}}},
    }
