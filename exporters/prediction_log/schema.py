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
- feedback_events (prediction_id): the label-change audit;
- review_items (answered_at, priority) WHERE answered_at IS NULL: the review queue's next items.

Version 2 (the review queue) adds the review_items table and says where each feedback event came
from (`source`: feedback, review; `reviewer`). The migration is this module's own few statements,
not Alembic: they run inside the same transaction and advisory lock as the rest of `migrate`, on
both engines, and a log of any earlier version (0, 1) comes up to 2 in one step; Alembic would add
an environment, a revision chain and a second way to say what the schema is, for two changes.
"""
from __future__ import annotations

from sqlalchemy import (Column, Connection, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        inspect, select, text)

SCHEMA_VERSION = 2

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
    Column("source", Text),  # NULL in logs from before version 2: those events came from POST /feedback
    Column("reviewer", Text),
    sqlite_autoincrement=True,
)

# The review queue: predictions handed to people for a label, in priority order. A lease gives an item
# to one reviewer until `lease_expires`; after that it is free again. An answered item stays (outcome
# labeled or skipped) so it is never queued twice; reason label_check marks items sent back for a second look.
review_items = Table(
    "review_items", metadata,
    Column("prediction_id", String(32), primary_key=True),
    Column("queued_at", Float(53), nullable=False),
    Column("priority", Float(53), nullable=False),
    Column("strategy", Text, nullable=False),
    Column("reason", Text),  # why it is queued beyond its score: abstained, label_check
    Column("lease_id", String(32)),
    Column("leased_to", Text),
    Column("lease_expires", Float(53)),
    Column("leases", Integer, nullable=False, server_default="0"),
    Column("answered_at", Float(53)),
    Column("outcome", Text),  # labeled | skipped
    Column("label", Text),
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
    Index("review_items_open", review_items.c.priority,
          sqlite_where=review_items.c.answered_at.is_(None), postgresql_where=review_items.c.answered_at.is_(None)),
)
# Columns later versions added to tables older logs already have: (table, column, SQL type).
_ADDED_COLUMNS = (("feedback_events", "source", "TEXT"), ("feedback_events", "reviewer", "TEXT"))
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
    inspector = inspect(conn)
    for table, column, sql_type in _ADDED_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
    for name in _RETIRED_INDEXES:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
    for index in INDEXES:
        index.create(conn, checkfirst=True)
    conn.execute(schema_version.delete())
    conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
    return found or 0
