"""The service's side of the review queue: requests in, queue calls out, answers shaped for the page.

The queue itself (leases, answers, state) is exporters.prediction_log.review_queue on the service's
own log database, so every replica shares it. This module checks what a reviewer sends, refills
the queue from the served model's predictions when it runs low, and counts what happens.
"""
from __future__ import annotations

import asyncio
import math
import time
import mimetypes
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exporters.prediction_log.review_queue import ReviewError, ReviewItem, ReviewQueue
from service.errors import BadRequest, NotFound, ServiceError, UnsupportedMediaType
from service.request_validation import parse_json

_STATUS = {"not_queued": 404, "foreign_lease": 409, "lease_expired": 409, "already_answered": 409, "not_answered": 409}


class NextIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reviewer: str = Field("reviewer", min_length=1, max_length=64, pattern=r"\S")
    count: int = Field(10, ge=1, le=50)


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    lease_id: str = Field(min_length=1, max_length=64, pattern=r"\S")
    prediction_id: str = Field(min_length=1, max_length=128, pattern=r"\S")
    label: str | None = Field(None, min_length=1, max_length=256, pattern=r"\S")
    skip: bool = False

    @model_validator(mode="after")
    def _label_or_skip(self) -> "AnswerIn":
        if (self.label is None) == (not self.skip):
            raise ValueError('give exactly one of "label" (the class) or "skip": true')
        return self


class UndoIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    lease_id: str = Field(min_length=1, max_length=64, pattern=r"\S")
    prediction_id: str = Field(min_length=1, max_length=128, pattern=r"\S")


def parse_body(model: type[BaseModel], body: bytes, content_type: str | None, allow_empty: bool = False):
    media_type = (content_type or "").split(";")[0].strip().lower()
    if allow_empty and not body.strip():
        return model()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"expected application/json, got '{media_type or 'no Content-Type'}'")
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}", code="malformed_json")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(f"'{'.'.join(map(str, err['loc'])) or 'body'}': {err['msg']}" for err in e.errors())
        raise BadRequest(f"invalid request: {problems}", code="invalid_review_request") from None


def _refused(e: ReviewError) -> ServiceError:
    return ServiceError(str(e), code=e.kind, status=_STATUS.get(e.kind, 409))


class ReviewDesk:
    def __init__(self, runtime):
        """`runtime`: the service.runtime.ServingRuntime that owns this desk (its log, models, metrics)."""
        self.rt = runtime
        self.queue = ReviewQueue(runtime.log)
        self._refilled_at = -math.inf

    @property
    def settings(self):
        return self.rt.settings

    def _item(self, item: ReviewItem) -> dict:
        rec = item.prediction
        model = self.rt.models.current
        labels = list(model.labels) if model and model.version == rec.model_version else self.rt.known_labels()
        probs = rec.probabilities
        order = sorted(range(len(probs)), key=lambda j: -probs[j])[: self.settings.top_k]
        return {"prediction_id": rec.prediction_id, "filename": rec.filename, "model_version": rec.model_version,
                "image_url": f"/review/image/{rec.prediction_id}?lease_id={item.lease_id}",
                "predicted_label": rec.label, "confidence": rec.confidence,
                "top_k": [{"label": labels[j], "probability": probs[j]} for j in order if j < len(labels)],
                "reason": item.reason, "strategy": item.strategy, "answered_label": rec.feedback_label}

    def _refill(self, count: int) -> None:
        """Queue traffic that arrived since the last refill. Not only when the queue runs low: a queue
        still holding yesterday's leftovers would otherwise never show a reviewer today's shifted images.
        Throttled, since the candidate query reads the newest predictions of the served model."""
        model = self.rt.models.current
        now = time.monotonic()
        if model is None or (now - self._refilled_at < self.settings.review_refill_s and self.queue.state().waiting >= count):
            return
        self._refilled_at = now
        reference = model.reference.embeddings_sample
        self.queue.refill(model.version, self.settings.review_strategy, model.calibration, reference,
                          self.settings.review_pool)

    def _state(self) -> dict:
        state = self.queue.state().as_dict()
        self.rt.metrics.review_queue_depth.set(state["waiting"])
        return {**state, "strategy": self.settings.review_strategy, "lease_seconds": self.settings.review_lease_s}

    async def next(self, body: NextIn) -> dict:
        def work():
            self._refill(body.count)
            items, expired = self.queue.lease(body.reviewer, body.count, self.settings.review_lease_s)
            return items, expired, self._state()

        items, expired, state = await asyncio.to_thread(work)
        if expired:
            self.rt.metrics.review_expired_leases.inc(expired)
        model = self.rt.models.current
        return {"lease_id": items[0].lease_id if items else None,
                "lease_expires": items[0].lease_expires if items else None,
                "labels": list(model.labels) if model else self.rt.known_labels(),
                "items": [self._item(i) for i in items], "state": state}

    async def answer(self, body: AnswerIn) -> dict:
        if body.label is not None:
            record = await asyncio.to_thread(self.rt.log.get_prediction, body.prediction_id)
            if record is None:
                raise NotFound(f"no prediction with id '{body.prediction_id}'", code="not_queued")
            self.rt._check_label(body.label, record.model_version)
        try:
            answer = await asyncio.to_thread(self.queue.answer, body.lease_id, body.prediction_id, body.label)
        except ReviewError as e:
            raise _refused(e) from None
        if answer.outcome == "labeled":
            self.rt.count_label(answer.previous_label, answer.label, answer.predicted_label, answer.changed)
            self.rt.metrics.record_review_label(answer.seconds_since_prediction)
        return {"prediction_id": answer.prediction_id, "outcome": answer.outcome, "label": answer.label,
                "predicted_label": answer.predicted_label, "changed": answer.changed,
                "state": await asyncio.to_thread(self._state)}

    async def undo(self, body: UndoIn) -> dict:
        try:
            item = await asyncio.to_thread(self.queue.undo, body.lease_id, body.prediction_id, self.settings.review_lease_s)
        except ReviewError as e:
            raise _refused(e) from None
        return {"item": self._item(item), "lease_expires": item.lease_expires, "state": await asyncio.to_thread(self._state)}

    async def state(self) -> dict:
        return await asyncio.to_thread(self._state)

    async def image(self, prediction_id: str, lease_id: str | None) -> tuple[bytes, str]:
        """The stored image of an item this lease holds (a reviewer sees only what they were handed)."""
        if not lease_id or not lease_id.strip():
            raise BadRequest("give the item's lease: /review/image/<prediction_id>?lease_id=<lease_id>", code="missing_lease")
        record = await asyncio.to_thread(self.queue.held_prediction, lease_id, prediction_id)
        if record is None:
            raise ServiceError(f"prediction {prediction_id} is not held by lease {lease_id}", code="foreign_lease", status=409)
        data = await asyncio.to_thread(self.rt.log.image_bytes, record.image_sha256)
        return data, mimetypes.guess_type(record.filename)[0] or _sniff(data)


def _sniff(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # how the store keeps OIP pixel images
        return "image/webp"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return "application/octet-stream"
