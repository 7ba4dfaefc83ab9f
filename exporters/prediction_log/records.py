"""What the prediction log holds and the one interface its readers and writers use.

Two ways a label reaches the loop, named the same everywhere (code, metrics, JSON, this log):
- *feedback*: a label given on a prediction, by its prediction_id (POST /feedback);
- *labeled upload*: a new image sent with its label (POST /feedback/image).
Together they are the *labeled examples* a retrain learns from.

Shared by the service (the writer) and the drift report and retrain job (readers); it lives in
exporters/ because both rooms use it and it needs only the storage layer, SQLAlchemy and numpy.

Records live in a SQL database (exporters/prediction_log/sql.py): by default a SQLite file (WAL) in a local
data dir; `CNNLOOP_LOG_URL=postgresql://...` when several replicas share one log. Every feedback
event is kept (table feedback_events), not only the latest label, so the drift report can audit
how often labels were changed (`label_changes`).

Images are content-addressed in the data dir (a local path or s3://), so the same photo is stored
once however often it is predicted:
    images/ab/ab12...          raw bytes as uploaded
    predictions.sqlite3        (local data dir, no log URL) tables predictions, feedback_events, labeled_uploads
Logs written by cnnloop before the SQL log kept one S3 object per record; `cnnloop log import-s3`
moves them into the database (exporters/prediction_log/legacy_s3.py).
"""
from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np

from exporters.storage import Store

# Where a labeled example came from: LabeledExample.source and the cnnloop_feedback metric's `source`.
FEEDBACK = "feedback"
LABELED_UPLOAD = "labeled_upload"
# Where a feedback label came from (feedback_events.source): a client's POST /feedback, or a person
# answering the review queue (the same feedback path; a retrain treats both as feedback).
REVIEW = "review"


def new_record_id(now: float | None = None) -> str:
    """32 hex chars: 12 of milliseconds since the epoch, then 20 random. Time-ordered, collision-free."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


def record_time(record_id: str) -> float:
    """When a record id was minted (seconds since the epoch); ValueError if not an id."""
    if not is_record_id(record_id):
        raise ValueError(f"{record_id!r} is not a record id")
    return int(record_id[:12], 16) / 1000


def is_record_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def image_key(sha256: str) -> str:
    return f"images/{sha256[:2]}/{sha256}"


def encode_embedding(embedding: np.ndarray | None) -> bytes | None:
    return None if embedding is None else np.asarray(embedding, dtype=np.float16).tobytes()


def decode_embedding(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float16).astype(np.float32)


@dataclass
class PredictionRecord:
    prediction_id: str
    created_at: float
    model_version: str
    label: str
    confidence: float
    probabilities: list[float]
    image_sha256: str
    image_stored: bool
    filename: str
    embedding: bytes | None = field(default=None, repr=False)  # float16, see encode_embedding
    # "pca": projected on the bundle's reference PCA basis (what the drift report compares); "raw": pooled embedding
    embedding_space: str | None = None
    feedback_label: str | None = None
    feedback_at: float | None = None


@dataclass(frozen=True)
class FeedbackOutcome:
    prediction_id: str
    label: str
    predicted_label: str
    previous_label: str | None
    changed: bool  # False when the same label was already recorded (idempotent repeat)


@dataclass(frozen=True)
class LabeledExample:
    """One training example the loop has earned: stored image bytes + a human label."""

    image_sha256: str
    label: str
    source: str  # FEEDBACK | LABELED_UPLOAD
    record_id: str  # the prediction_id (feedback) or the upload_id (labeled upload)
    labeled_at: float  # when the label arrived (the latest feedback event, or the upload)


@dataclass(frozen=True)
class LabelChanges:
    """The feedback events on a set of predictions: an audit of how labels were given and changed."""

    count: int  # feedback events: first labels and changes alike
    relabelled_predictions: int  # predictions whose feedback label was changed after it was first given

    def as_dict(self) -> dict:
        return asdict(self)


def store_image_once(store: Store, sha256: str, data: bytes) -> None:
    key = image_key(sha256)
    if not store.exists(key):  # the common repeat costs one stat/HEAD; a race still writes it only once
        store.put_if_absent(key, data)


class PredictionLog(Protocol):
    def store_image(self, sha256: str, data: bytes) -> None: ...
    def add_predictions(self, records: list[PredictionRecord]) -> None: ...
    def get_prediction(self, prediction_id: str) -> PredictionRecord | None: ...
    def record_feedback(self, prediction_id: str, label: str) -> FeedbackOutcome | None: ...
    def add_labeled_upload(self, sha256: str, label: str, filename: str) -> str: ...
    def feedback_summary(self) -> tuple[int, int]: ...
    def label_changes(self, prediction_ids: Iterable[str]) -> LabelChanges: ...
    def labeled_examples(self) -> Iterator[LabeledExample]: ...
    def labeled_predictions(self) -> list[PredictionRecord]: ...
    def predictions(self, since: float | None = None, last: int | None = None,
                    model_version: str | None = None) -> list[PredictionRecord]: ...
    def image_bytes(self, sha256: str) -> bytes: ...
    def close(self) -> None: ...
    def feedback_without_image(self) -> int: ...
    def count_predictions(self) -> int: ...
    def describe(self) -> str: ...
