"""Logs written before the SQL log, on S3: read them once and move their records into the database.

Those logs kept one JSON object per record under the data dir:
    predictions/<date>/<id>.json    one per predicted image
    feedback/<id>/<ns>-<rand>.json  one per feedback event (the newest is the label)
    labeled/<date>/<id>.json        one per labeled upload (older ones call the id input_id)
The images under images/ are already where the SQL log keeps them, so they are not touched.
Importing is idempotent: records whose id the database already has are skipped, so an
interrupted import is finished by running it again.
"""
from __future__ import annotations

import base64
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import insert, select, text

from exporters.prediction_log import schema
from exporters.prediction_log.records import PredictionRecord
from exporters.prediction_log.sql import SqlPredictionLog, row_values
from exporters.storage import Store

_CHUNK = 500


@dataclass(frozen=True)
class ImportCounts:
    predictions: int
    feedback_events: int
    labeled_uploads: int
    skipped: int  # already in the database

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _existing(log: SqlPredictionLog, column, ids: list[str]) -> set[str]:
    found: set[str] = set()
    with log.engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            found.update(conn.execute(select(column).where(column.in_(ids[start:start + _CHUNK]))).scalars())
    return found


def _record_from_json(d: dict) -> PredictionRecord:
    """A legacy prediction object: the record's fields, its embedding bytes base64-encoded."""
    d = {k: v for k, v in d.items() if k in PredictionRecord.__dataclass_fields__}
    d["embedding"] = base64.b64decode(d["embedding"]) if d.get("embedding") else None
    return PredictionRecord(**d)


def _read_events(store: Store) -> dict[str, list[dict]]:
    events: dict[str, list[dict]] = defaultdict(list)
    for key in sorted(store.list("feedback")):  # keys sort by time within a prediction
        events[key.split("/")[1]].append(json.loads(store.get_bytes(key)))
    return events


def import_legacy_s3_log(store: Store, log: SqlPredictionLog, progress: Callable[[int], None] = lambda n: None) -> ImportCounts:
    """Copy every legacy record under `store` into `log`; `progress(n)` after each n objects read."""
    keys = store.list("predictions")
    ids = [k.rsplit("/", 1)[-1].removesuffix(".json") for k in keys]
    have = _existing(log, schema.predictions.c.prediction_id, ids)
    events = _read_events(store)
    n_pred = n_events = skipped = 0
    for start in range(0, len(keys), _CHUNK):
        rows, event_rows = [], []
        for key, pid in zip(keys[start:start + _CHUNK], ids[start:start + _CHUNK]):
            if pid in have:
                skipped += 1
                continue
            record = _record_from_json(json.loads(store.get_bytes(key)))
            for e in events.get(pid, []):
                event_rows.append({"prediction_id": pid, "label": e["label"], "previous_label": e.get("previous_label"), "at": e["at"]})
            if events.get(pid):
                record.feedback_label, record.feedback_at = events[pid][-1]["label"], events[pid][-1]["at"]
            rows.append(record)
        # Records and their events commit together: a rerun after a crash finds either both or neither.
        with log.engine.begin() as conn:
            if rows:
                conn.execute(insert(schema.predictions), [row_values(r) for r in rows])
            if event_rows:
                conn.execute(insert(schema.feedback_events), event_rows)
        n_pred, n_events = n_pred + len(rows), n_events + len(event_rows)
        progress(min(_CHUNK, len(keys) - start))
    uploads = [json.loads(store.get_bytes(k)) for k in store.list("labeled")]
    for d in uploads:
        d.setdefault("upload_id", d.pop("input_id", None))
    have_uploads = _existing(log, schema.labeled_uploads.c.upload_id, [d["upload_id"] for d in uploads])
    new_uploads = [{c: d[c] for c in ("upload_id", "created_at", "image_sha256", "label", "filename")}
                   for d in uploads if d["upload_id"] not in have_uploads]
    if new_uploads:
        with log.engine.begin() as conn:
            conn.execute(insert(schema.labeled_uploads), new_uploads)
    # A bulk load leaves the planner without statistics until autovacuum runs: gather them now.
    with log.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    return ImportCounts(n_pred, n_events, len(new_uploads), skipped + len(uploads) - len(new_uploads))
