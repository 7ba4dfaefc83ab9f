"""The prediction log on SQL: one implementation for the embedded SQLite file and for PostgreSQL.

SQLAlchemy Core 2.x carries both (psycopg 3 drives PostgreSQL); the few engine differences live
in `_engine`: SQLite runs in WAL mode (readers never block the writer) and takes its write lock at
BEGIN when a transaction reads before it writes; PostgreSQL locks the one prediction row a
feedback changes (SELECT ... FOR UPDATE) and serialises schema migration with an advisory lock, so
N replicas can start on one empty database at once.

Rows go in as one multi-row INSERT per batch (SQLAlchemy's insertmanyvalues): a batch of 500
predictions costs one round trip, not 500. Images stay content-addressed in the data store.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Iterator

from sqlalchemy import Engine, case, create_engine, event, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from exporters.prediction_log import schema
from exporters.prediction_log.records import (FEEDBACK, LABELED_UPLOAD, FeedbackOutcome, LabelChanges, LabeledExample,
                                      PredictionRecord, image_key, new_record_id, store_image_once)
from exporters.storage import Store, StorageError, open_store

SQLITE_FILE = "predictions.sqlite3"
_COLUMNS = [c.name for c in schema.predictions.columns]
# SQLite's default bound on `?` parameters is 999 before 3.32: query id sets in chunks below it.
_IDS_PER_QUERY = 500
# SQLAlchemy's insertmanyvalues sends up to this many rows in one INSERT statement (its default page size).
_ROWS_PER_STATEMENT = 1000
# Any constant: the key of the advisory lock replicas take while one of them migrates the schema.
_MIGRATION_LOCK = 0x636E6E6C6F6F70


class LogUrlError(ValueError):
    pass


def database_url(data_dir: str, log_url: str | None) -> str:
    """The SQLAlchemy URL of the log: `log_url` when given, else the SQLite file in a local data dir."""
    if not log_url:
        if data_dir.startswith("s3://"):
            raise LogUrlError(
                f"the data dir {data_dir} is on S3, which keeps the stored images only: set CNNLOOP_LOG_URL "
                "(--log-url) to the database that keeps the predictions and feedback, e.g. "
                "postgresql://user:password@host:5432/cnnloop (one database every replica and the retrain job share)")
        return f"sqlite:///{Path(data_dir).resolve() / SQLITE_FILE}"
    url = sqlalchemy_url(log_url)
    if url is not None:
        return url
    raise LogUrlError(f"CNNLOOP_LOG_URL {redact(log_url)!r} is not a database URL cnnloop can use: give "
                      "postgresql://user:password@host:5432/dbname or sqlite:///absolute/path/log.sqlite3")


def sqlalchemy_url(url: str) -> str | None:
    """postgresql:// (driven by psycopg 3, the driver installed) or sqlite:// as SQLAlchemy opens it; None if neither."""
    scheme = url.split(":", 1)[0]
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg:" + url.split(":", 1)[1]
    if scheme in ("postgresql+psycopg", "sqlite"):
        return url
    return None


def redact(url: str) -> str:
    """The URL without its password, fit for logs, /info and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        Path(make_url(url).database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" below says when a transaction starts
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power cut may drop the last transactions, never corrupts the file.
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            # A read-then-write transaction takes the write lock first: two writers never deadlock on upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writes") else "BEGIN")

        return engine
    return create_engine(url, pool_size=4, max_overflow=8, pool_recycle=1800)


def apply_feedback(conn, prediction_id: str, label: str, source: str, reviewer: str | None = None,
                   now: float | None = None) -> FeedbackOutcome | None:
    """Give a prediction its label inside the caller's write transaction: the one feedback path of
    POST /feedback and the review queue (every change kept in feedback_events with its source)."""
    p = schema.predictions
    now = time.time() if now is None else now
    row = conn.execute(select(p.c.label, p.c.feedback_label).where(p.c.prediction_id == prediction_id)
                       .with_for_update()).first()
    if row is None:
        return None
    predicted, previous = row
    changed = previous != label
    if changed:
        conn.execute(update(p).where(p.c.prediction_id == prediction_id).values(feedback_label=label, feedback_at=now))
        conn.execute(insert(schema.feedback_events).values(prediction_id=prediction_id, label=label, previous_label=previous,
                                                           at=now, source=source, reviewer=reviewer))
    return FeedbackOutcome(prediction_id, label, predicted, previous, changed)


def row_values(r: PredictionRecord) -> dict:
    d = {name: getattr(r, name) for name in _COLUMNS}
    d["probabilities"] = json.dumps(r.probabilities)
    d["image_stored"] = int(r.image_stored)
    return d


def _record_from_row(row) -> PredictionRecord:
    d = dict(row._mapping)
    d["probabilities"] = json.loads(d["probabilities"])
    d["image_stored"] = bool(d["image_stored"])
    d["embedding"] = bytes(d["embedding"]) if d["embedding"] is not None else None  # PostgreSQL gives memoryview
    return PredictionRecord(**d)


class SqlPredictionLog:
    """Records in SQLite or PostgreSQL; image bytes in the data store (a local dir or S3)."""

    def __init__(self, url: str, images: Store):
        self.url = url
        self.images = images
        self.engine = _engine(url)
        try:
            with self.engine.connect().execution_options(writes=True) as conn, conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                schema.migrate(conn, self.describe())
        except DBAPIError as e:
            self.engine.dispose()
            reason = " ".join(str(e.orig).split())  # libpq's message spans lines
            raise StorageError(f"cannot open the prediction log {self.describe()}: {reason}; check CNNLOOP_LOG_URL "
                               "(host, port, user, password, database) and that the server is up") from e
        except BaseException:
            self.engine.dispose()
            raise

    def describe(self) -> str:
        return redact(self.url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _insert_new(self, table):
        return (postgresql if self.dialect == "postgresql" else sqlite).insert(table).on_conflict_do_nothing()

    # writes --------------------------------------------------------------------------------

    def store_image(self, sha256: str, data: bytes) -> None:
        store_image_once(self.images, sha256, data)

    def add_predictions(self, records: list[PredictionRecord]) -> None:
        if records:
            # ON CONFLICT DO NOTHING: a batch retried after a commit whose answer was lost lands once.
            rows = [row_values(r) for r in records]
            if self.dialect == "postgresql" and len(rows) <= _ROWS_PER_STATEMENT:
                # One multi-row statement is atomic by itself: autocommit saves BEGIN and COMMIT, two of
                # its three round trips.
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(self._insert_new(schema.predictions), rows)
                return
            with self.engine.begin() as conn:
                conn.execute(self._insert_new(schema.predictions), rows)

    def record_feedback(self, prediction_id: str, label: str) -> FeedbackOutcome | None:
        with self.engine.connect().execution_options(writes=True) as conn, conn.begin():
            return apply_feedback(conn, prediction_id, label, FEEDBACK)

    def add_labeled_upload(self, sha256: str, label: str, filename: str) -> str:
        upload_id = new_record_id()
        with self.engine.begin() as conn:
            conn.execute(insert(schema.labeled_uploads).values(upload_id=upload_id, created_at=time.time(),
                                                               image_sha256=sha256, label=label, filename=filename))
        return upload_id

    # reads ---------------------------------------------------------------------------------

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.predictions).where(schema.predictions.c.prediction_id == prediction_id)).first()
        return None if row is None else _record_from_row(row)

    def feedback_summary(self) -> tuple[int, int]:
        """(predictions with a feedback label, of which the model predicted that label)."""
        p = schema.predictions
        with self.engine.connect() as conn:
            n, agreed = conn.execute(select(func.count(), func.coalesce(func.sum(case((p.c.feedback_label == p.c.label, 1), else_=0)), 0))
                                     .where(p.c.feedback_label.isnot(None))).one()
        return int(n), int(agreed)

    def feedback_without_image(self) -> int:
        """Feedback given on predictions whose image was not stored (store_sample_rate < 1): labels no retrain can use."""
        p = schema.predictions
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(p.c.feedback_label.isnot(None), p.c.image_stored == 0)).scalar_one())

    def label_changes(self, prediction_ids: Iterable[str]) -> LabelChanges:
        e = schema.feedback_events
        ids = list(prediction_ids)
        count = relabelled = 0
        with self.engine.connect() as conn:
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start:start + _IDS_PER_QUERY]
                n, r = conn.execute(select(func.count(), func.count(func.distinct(case((e.c.previous_label.isnot(None), e.c.prediction_id)))))
                                    .where(e.c.prediction_id.in_(chunk))).one()
                count, relabelled = count + n, relabelled + r
        return LabelChanges(count, relabelled)

    def labeled_examples(self) -> Iterator[LabeledExample]:
        p, u = schema.predictions, schema.labeled_uploads
        with self.engine.connect() as conn:
            feedback = conn.execute(select(p.c.image_sha256, p.c.feedback_label, p.c.prediction_id, p.c.feedback_at)
                                    .where(p.c.feedback_label.isnot(None), p.c.image_stored == 1)).all()
            uploads = conn.execute(select(u.c.image_sha256, u.c.label, u.c.upload_id, u.c.created_at)).all()
        for sha, label, rid, at in feedback:
            yield LabeledExample(sha, label, FEEDBACK, rid, at)
        for sha, label, rid, at in uploads:
            yield LabeledExample(sha, label, LABELED_UPLOAD, rid, at)

    def labeled_predictions(self) -> list[PredictionRecord]:
        """Every prediction with a label and a stored image (what the retrain job's label check reads)."""
        p = schema.predictions
        with self.engine.connect() as conn:
            rows = conn.execute(select(p).where(p.c.feedback_label.isnot(None), p.c.image_stored == 1)
                                .order_by(p.c.created_at, p.c.prediction_id)).all()
        return [_record_from_row(row) for row in rows]

    def predictions(self, since: float | None = None, last: int | None = None,
                    model_version: str | None = None) -> list[PredictionRecord]:
        """The window, oldest first: newest-first index scans, so `last=N` reads N rows whatever the log's size."""
        p = schema.predictions
        order = [p.c.created_at.desc(), p.c.prediction_id.desc()]
        query = select(p)
        if since is not None:
            query = query.where(p.c.created_at >= since)
        if model_version is not None:
            # The order of predictions_model_window itself: the planner walks that index whatever share
            # of the log the version has, instead of scanning the time index and filtering.
            query = query.where(p.c.model_version == model_version)
            order.insert(0, p.c.model_version.desc())
        query = query.order_by(*order)
        if last:
            query = query.limit(int(last))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_record_from_row(row) for row in reversed(rows)]

    def count_predictions(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.predictions)).scalar_one())

    def image_bytes(self, sha256: str) -> bytes:
        return self.images.get_bytes(image_key(sha256))

    def close(self) -> None:
        self.engine.dispose()


def open_prediction_log(data_dir: str, endpoint_url: str | None = None, log_url: str | None = None) -> SqlPredictionLog:
    """The log a data dir and log URL name: records in SQL (`log_url`, or SQLite in a local data dir), images in the data dir."""
    url = database_url(data_dir, log_url)
    return SqlPredictionLog(url, open_store(data_dir, endpoint_url=endpoint_url))


