"""Where predictions and labels are kept, so that labeled examples become training data.

Two ways a label reaches the loop, named the same everywhere (code, metrics, JSON, this log):
- *feedback*: a label given on a prediction, by its prediction_id (POST /feedback);
- *labeled upload*: a new image sent with its label (POST /feedback/image).
Together they are the *labeled examples* a retrain learns from.

Shared by the service (the writer) and the drift report and retrain job (readers); it lives in
exporters/ because both rooms use it and it needs only the storage layer and numpy.

Two backends behind one small interface:
- `SqlitePredictionLog` (default, local data dir): one SQLite file in WAL mode (readers never block
  the writer; a crash loses nothing committed) plus content-addressed image files.
- `S3PredictionLog` (data dir `s3://...`): one object per record under a key no other replica can
  produce (a time-ordered random id), so N replicas write at once without a lock and without losing
  or overwriting anything. Feedback is one object per event; the newest event wins on read.

Every feedback event is kept (SQLite table feedback_events, S3 feedback/<id>/...), not only the
latest label, so the drift report can audit how often labels were changed (`label_changes`).

Images are content-addressed: `images/<sha256[:2]>/<sha256>`, so the same photo is stored once
however often it is predicted. Layout (both backends, S3 keys relative to the data dir):
    images/ab/ab12...               raw bytes as uploaded
    predictions/2024-05-01/<id>.json   (S3) one record per predicted image
    feedback/<id>/<ns>-<rand>.json     (S3) one event per feedback change
    labeled/2024-05-01/<id>.json       (S3) one record per labeled upload
    predictions.sqlite3                (local) tables predictions, feedback_events, labeled_uploads
"""
from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from exporters.storage import Store, open_store

SQLITE_FILE = "predictions.sqlite3"

# Where a labeled example came from: LabeledExample.source and the cnnloop_feedback metric's `source`.
FEEDBACK = "feedback"
LABELED_UPLOAD = "labeled_upload"


def new_record_id(now: float | None = None) -> str:
    """32 hex chars: 12 of milliseconds since the epoch, then 20 random. Time-ordered, collision-free."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012x}{secrets.token_hex(10)}"


def record_date(record_id: str) -> str:
    """The UTC date a record id was minted on, e.g. '2024-05-01' (the S3 key partition); ValueError if not an id."""
    if not is_record_id(record_id):
        raise ValueError(f"{record_id!r} is not a record id")
    ms = int(record_id[:12], 16)
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


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

    def to_json(self) -> dict:
        d = asdict(self)
        d["embedding"] = base64.b64encode(self.embedding).decode() if self.embedding is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "PredictionRecord":
        d = dict(d)
        d["embedding"] = base64.b64decode(d["embedding"]) if d.get("embedding") else None
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


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
    def predictions(self, since: float | None = None, last: int | None = None,
                    model_version: str | None = None) -> list[PredictionRecord]: ...
    def image_bytes(self, sha256: str) -> bytes: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    prediction_id TEXT PRIMARY KEY, created_at REAL NOT NULL, model_version TEXT NOT NULL,
    label TEXT NOT NULL, confidence REAL NOT NULL, probabilities TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, image_stored INTEGER NOT NULL, filename TEXT NOT NULL,
    embedding BLOB, embedding_space TEXT, feedback_label TEXT, feedback_at REAL);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions(created_at);
CREATE TABLE IF NOT EXISTS feedback_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, prediction_id TEXT NOT NULL, label TEXT NOT NULL,
    previous_label TEXT, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_events_prediction ON feedback_events(prediction_id);
CREATE TABLE IF NOT EXISTS labeled_uploads (
    upload_id TEXT PRIMARY KEY, created_at REAL NOT NULL, image_sha256 TEXT NOT NULL,
    label TEXT NOT NULL, filename TEXT NOT NULL);
"""
_COLUMNS = list(PredictionRecord.__dataclass_fields__)
# SQLite's default bound on `?` parameters is 999 before 3.32: query id sets in chunks below it.
_IDS_PER_QUERY = 500


def _has_old_layout(db: sqlite3.Connection) -> bool:
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return "labeled_inputs" in tables and "labeled_uploads" not in tables


def _migrate_old_layout(db: sqlite3.Connection) -> None:
    """Logs written before labeled uploads had that name kept them in labeled_inputs(input_id, ...)."""
    if not _has_old_layout(db):
        return
    db.execute("BEGIN IMMEDIATE")  # two processes opening one old log at once: one renames, the other sees it done
    try:
        if _has_old_layout(db):
            db.execute("ALTER TABLE labeled_inputs RENAME TO labeled_uploads")
            db.execute("ALTER TABLE labeled_uploads RENAME COLUMN input_id TO upload_id")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _record_from_row(row: tuple) -> PredictionRecord:
    d = dict(zip(_COLUMNS, row))
    d["probabilities"] = json.loads(d["probabilities"])
    d["image_stored"] = bool(d["image_stored"])
    return PredictionRecord(**d)


class SqlitePredictionLog:
    """SQLite (WAL) records + content-addressed image files, under one local directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.images = open_store(str(self.root))
        self.path = self.root / SQLITE_FILE
        # One connection shared by the log's callers; the lock serialises them (SQLite has one writer anyway).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power cut may drop the last transactions, never corrupts the file.
            self._db.execute("PRAGMA synchronous=NORMAL")
            _migrate_old_layout(self._db)
            self._db.executescript(_SCHEMA)

    def store_image(self, sha256: str, data: bytes) -> None:
        store_image_once(self.images, sha256, data)

    def image_path(self, sha256: str) -> Path:
        return self.root / image_key(sha256)

    def add_predictions(self, records: list[PredictionRecord]) -> None:
        rows = [
            (r.prediction_id, r.created_at, r.model_version, r.label, r.confidence, json.dumps(r.probabilities),
             r.image_sha256, int(r.image_stored), r.filename, r.embedding, r.embedding_space, r.feedback_label, r.feedback_at)
            for r in records
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT INTO predictions ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})", rows)
            self._db.execute("COMMIT")

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM predictions WHERE prediction_id = ?",
                                   (prediction_id,)).fetchone()
        return None if row is None else _record_from_row(row)

    def record_feedback(self, prediction_id: str, label: str) -> FeedbackOutcome | None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT label, feedback_label FROM predictions WHERE prediction_id = ?",
                                       (prediction_id,)).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    return None
                predicted, previous = row
                changed = previous != label
                if changed:
                    self._db.execute("UPDATE predictions SET feedback_label = ?, feedback_at = ? WHERE prediction_id = ?",
                                     (label, now, prediction_id))
                    self._db.execute("INSERT INTO feedback_events (prediction_id, label, previous_label, at) VALUES (?,?,?,?)",
                                     (prediction_id, label, previous, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return FeedbackOutcome(prediction_id, label, predicted, previous, changed)

    def add_labeled_upload(self, sha256: str, label: str, filename: str) -> str:
        upload_id = new_record_id()
        with self._lock:
            self._db.execute("INSERT INTO labeled_uploads (upload_id, created_at, image_sha256, label, filename) VALUES (?,?,?,?,?)",
                             (upload_id, time.time(), sha256, label, filename))
        return upload_id

    def feedback_summary(self) -> tuple[int, int]:
        """(predictions with a feedback label, of which the model predicted that label)."""
        with self._lock:
            n, agreed = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(feedback_label = label), 0) FROM predictions WHERE feedback_label IS NOT NULL"
            ).fetchone()
        return int(n), int(agreed)

    def label_changes(self, prediction_ids: Iterable[str]) -> LabelChanges:
        ids = list(prediction_ids)
        count = relabelled = 0
        with self._lock:
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start : start + _IDS_PER_QUERY]
                n, r = self._db.execute(
                    "SELECT COUNT(*), COUNT(DISTINCT CASE WHEN previous_label IS NOT NULL THEN prediction_id END) "
                    f"FROM feedback_events WHERE prediction_id IN ({','.join('?' * len(chunk))})", chunk).fetchone()
                count, relabelled = count + n, relabelled + r
        return LabelChanges(count, relabelled)

    def labeled_examples(self) -> Iterator[LabeledExample]:
        with self._lock:
            feedback = self._db.execute("SELECT image_sha256, feedback_label, prediction_id, feedback_at FROM predictions "
                                        "WHERE feedback_label IS NOT NULL AND image_stored = 1").fetchall()
            uploads = self._db.execute("SELECT image_sha256, label, upload_id, created_at FROM labeled_uploads").fetchall()
        for sha, label, rid, at in feedback:
            yield LabeledExample(sha, label, FEEDBACK, rid, at)
        for sha, label, rid, at in uploads:
            yield LabeledExample(sha, label, LABELED_UPLOAD, rid, at)

    def predictions(self, since: float | None = None, last: int | None = None,
                    model_version: str | None = None) -> list[PredictionRecord]:
        where, args = [], []
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if model_version is not None:
            where.append("model_version = ?")
            args.append(model_version)
        sql = f"SELECT {','.join(_COLUMNS)} FROM predictions"
        sql += (" WHERE " + " AND ".join(where)) if where else ""
        sql += " ORDER BY prediction_id DESC" + (f" LIMIT {int(last)}" if last else "")
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_record_from_row(row) for row in reversed(rows)]

    def image_bytes(self, sha256: str) -> bytes:
        return self.images.get_bytes(image_key(sha256))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class S3PredictionLog:
    """One object per record on an S3 store: safe with any number of replicas writing at once."""

    def __init__(self, store: Store):
        self.store = store

    def store_image(self, sha256: str, data: bytes) -> None:
        store_image_once(self.store, sha256, data)

    def _put_new(self, key: str, body: dict) -> None:
        if not self.store.put_if_absent(key, json.dumps(body).encode()):
            raise RuntimeError(f"{self.store.describe(key)} already exists; record ids must be unique")

    @staticmethod
    def _prediction_key(prediction_id: str) -> str:
        return f"predictions/{record_date(prediction_id)}/{prediction_id}.json"

    def add_predictions(self, records: list[PredictionRecord]) -> None:
        for r in records:
            self._put_new(self._prediction_key(r.prediction_id), r.to_json())

    def _latest_feedback(self, prediction_id: str) -> tuple[str | None, float | None]:
        keys = sorted(self.store.list(f"feedback/{prediction_id}"))
        if not keys:
            return None, None
        event = json.loads(self.store.get_bytes(keys[-1]))
        return event["label"], event["at"]

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        try:
            key = self._prediction_key(prediction_id)
        except ValueError:  # not an id this service minted (malformed, or a date out of range)
            return None
        if not self.store.exists(key):
            return None
        record = PredictionRecord.from_json(json.loads(self.store.get_bytes(key)))
        record.feedback_label, record.feedback_at = self._latest_feedback(prediction_id)
        return record

    def record_feedback(self, prediction_id: str, label: str) -> FeedbackOutcome | None:
        record = self.get_prediction(prediction_id)
        if record is None:
            return None
        previous = record.feedback_label
        changed = previous != label
        if changed:
            now = time.time()
            # ns timestamp first: the newest event sorts last; the random tail keeps two replicas'
            # events in the same nanosecond apart.
            key = f"feedback/{prediction_id}/{time.time_ns():020d}-{secrets.token_hex(4)}.json"
            self._put_new(key, {"prediction_id": prediction_id, "label": label, "previous_label": previous, "at": now})
        return FeedbackOutcome(prediction_id, label, record.label, previous, changed)

    def add_labeled_upload(self, sha256: str, label: str, filename: str) -> str:
        upload_id = new_record_id()
        body = {"upload_id": upload_id, "created_at": time.time(), "image_sha256": sha256, "label": label, "filename": filename}
        self._put_new(f"labeled/{record_date(upload_id)}/{upload_id}.json", body)
        return upload_id

    def feedback_summary(self) -> tuple[int, int]:
        # Counting would read every feedback object; on S3 the gauge starts from this process's feedback.
        return 0, 0

    def label_changes(self, prediction_ids: Iterable[str]) -> LabelChanges:
        wanted = set(prediction_ids)
        events = Counter(pid for pid in (key.split("/")[1] for key in self.store.list("feedback")) if pid in wanted)
        # The listing is enough, no object read: an event is written only when the label changes, so a
        # prediction's second event is a relabel (two replicas racing on a first label count as a relabel too).
        return LabelChanges(sum(events.values()), sum(1 for n in events.values() if n > 1))

    def labeled_examples(self) -> Iterator[LabeledExample]:
        seen: set[str] = set()
        for key in sorted(self.store.list("feedback")):
            pid = key.split("/")[1]
            if pid in seen:
                continue
            seen.add(pid)
            record = self.get_prediction(pid)
            if record and record.image_stored and record.feedback_label:
                yield LabeledExample(record.image_sha256, record.feedback_label, FEEDBACK, pid, record.feedback_at or 0.0)
        for key in self.store.list("labeled"):
            d = json.loads(self.store.get_bytes(key))
            # Objects written before labeled uploads had that name call the id input_id.
            upload_id = d["upload_id"] if "upload_id" in d else d["input_id"]
            yield LabeledExample(d["image_sha256"], d["label"], LABELED_UPLOAD, upload_id, d["created_at"])

    def predictions(self, since: float | None = None, last: int | None = None,
                    model_version: str | None = None) -> list[PredictionRecord]:
        # Keys are partitioned by UTC date: a `since` skips whole days without listing them.
        first_day = datetime.fromtimestamp(since, tz=timezone.utc).strftime("%Y-%m-%d") if since is not None else ""
        keys = [k for k in self.store.list("predictions") if k.split("/")[1] >= first_day]
        records = []
        # Newest first, so `--last N` reads about N objects instead of the whole log.
        for key in sorted(keys, key=lambda k: k.rsplit("/", 1)[-1], reverse=True):
            r = PredictionRecord.from_json(json.loads(self.store.get_bytes(key)))
            if (since is None or r.created_at >= since) and (model_version is None or r.model_version == model_version):
                records.append(r)
                if last and len(records) >= last:
                    break
        # One listing of feedback/ for the whole window, not one per record.
        latest: dict[str, str] = {}
        for key in sorted(self.store.list("feedback")):
            latest[key.split("/")[1]] = key
        for r in records:
            if r.prediction_id in latest:
                event = json.loads(self.store.get_bytes(latest[r.prediction_id]))
                r.feedback_label, r.feedback_at = event["label"], event["at"]
        return records[::-1]  # oldest first, like the SQLite log

    def image_bytes(self, sha256: str) -> bytes:
        return self.store.get_bytes(image_key(sha256))

    def close(self) -> None:
        pass


def open_prediction_log(data_dir: str, endpoint_url: str | None = None) -> PredictionLog:
    """SQLite under a local data dir, one object per record under an s3:// one."""
    if data_dir.startswith("s3://"):
        return S3PredictionLog(open_store(data_dir, endpoint_url=endpoint_url))
    return SqlitePredictionLog(data_dir)
