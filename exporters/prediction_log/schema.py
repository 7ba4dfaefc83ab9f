"""The prediction log's SQL schema, one definition for SQLite and PostgreSQL, and its migrations.

The tables are the ones SQLite logs have always had (so a log written by an older cnnloop opens
as it is); `schema_version` says which layout a database holds. `migrate` brings an older one up
to SCHEMA_VERSION in one transaction and refuses a newer one: a downgraded replica must never
write rows a newer layout reads differently.

Indexes serve the reads that must cost the window, not the history:
- predictions (model_version, created_at, prediction_id) and (created_at, prediction_id): the drift
  window (`--last N`, `--since`, per model version), newest first;
- predictions (feedback_at) WHERE feedback_label IS NOT NULL: the labeled examples, the feedback
  summary and the unstored-feedback count read only labeled rows;
- feedback_events (prediction_id): the label-change audit.
"""
from __future__ import annotations

from sqlalchemy import (Column, Connection, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        inspect, select, text)

SCHEMA_VERSION = 1

metadata = MetaData()

predictions = Table(
    "predictions", metadata,
    Column("prediction_id", String(32), primary_key=True),
    Column("created_at", Float(53), nullable=False),
    Column("model_version", Text, nullable=False),
    Column("label", Text, nullable=False),
    Column("confidence", Float(53), nullable=False),
    Column("probabilities", Text, nullable=False),  # JSON list: one column type on both engines
    Column("image_sha256", String(64), nullable=False),
    Column("image_stored", Integer, nullable=False),  # 0/1, as older SQLite logs wrote it
    Column("filename", Text, nullable=False),
    Column("embedding", LargeBinary),
    Column("embedding_space", Text),
    Column("feedback_label", Text),
    Column("feedback_at", Float(53)),
)

feedback_events = Table(
    "feedback_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("prediction_id", String(32), nullable=False),
    Column("label", Text, nullable=False),
    Column("previous_label", Text),
    Column("at", Float(53), nullable=False),
    sqlite_autoincrement=True,
)

labeled_uploads = Table(
    "labeled_uploads", metadata,
    Column("upload_id", String(32), primary_key=True),
    Column("created_at", Float(53), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("label", Text, nullable=False),
    Column("filename", Text, nullable=False),
)

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

INDEXES = (
    Index("predictions_model_window", predictions.c.model_version, predictions.c.created_at, predictions.c.prediction_id),
    Index("predictions_window", predictions.c.created_at, predictions.c.prediction_id),
    Index("predictions_labeled", predictions.c.feedback_at,
          sqlite_where=predictions.c.feedback_label.isnot(None), postgresql_where=predictions.c.feedback_label.isnot(None)),
    Index("feedback_events_prediction", feedback_events.c.prediction_id),
    Index("labeled_uploads_created", labeled_uploads.c.created_at),
)
# Indexes older SQLite logs had that the ones above replace.
_RETIRED_INDEXES = ("predictions_created",)


class SchemaTooNew(RuntimeError):
    pass


def _rename_old_labeled_table(conn: Connection, tables: set[str]) -> None:
    """Logs written before labeled uploads had that name kept them in labeled_inputs(input_id, ...)."""
    if "labeled_inputs" in tables and "labeled_uploads" not in tables:
        conn.execute(text("ALTER TABLE labeled_inputs RENAME TO labeled_uploads"))
        conn.execute(text("ALTER TABLE labeled_uploads RENAME COLUMN input_id TO upload_id"))


def stored_version(conn: Connection) -> int | None:
    """The layout version a database holds; 0 for a log from before the version table; None when empty."""
    tables = set(inspect(conn).get_table_names())
    if "schema_version" in tables:
        return conn.execute(select(schema_version.c.version)).scalar_one_or_none() or 0
    return 0 if tables & {"predictions", "labeled_inputs", "labeled_uploads"} else None


def migrate(conn: Connection, describe: str) -> int:
    """Create or upgrade the schema inside the caller's transaction; returns the version found."""
    found = stored_version(conn)
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaTooNew(f"{describe} holds prediction-log schema version {found}, newer than this cnnloop "
                           f"understands ({SCHEMA_VERSION}); upgrade cnnloop on this machine (every replica and the "
                           "retrain job must run a version that knows the log's schema)")
    if found == SCHEMA_VERSION:
        return found
    _rename_old_labeled_table(conn, set(inspect(conn).get_table_names()))
    metadata.create_all(conn, checkfirst=True)  # new tables only: the old ones keep their rows
    for name in _RETIRED_INDEXES:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
    for index in INDEXES:
        index.create(conn, checkfirst=True)
    conn.execute(schema_version.delete())
    conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
    return found or 0
