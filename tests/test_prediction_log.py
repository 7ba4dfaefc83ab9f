"""The prediction log (exporters.prediction_log.records, exporters.prediction_log.sql) on SQLite and on a real PostgreSQL server:
record ids, feedback, replicas writing at once, schema versions, indexed window reads, old layouts."""
from __future__ import annotations

import base64
import json
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone

import numpy as np
import pytest
from sqlalchemy import event, text

from exporters.prediction_log.schema import SCHEMA_VERSION, SchemaTooNew
from exporters.prediction_log.records import FEEDBACK, LABELED_UPLOAD, PredictionRecord, new_record_id, record_time
from exporters.prediction_log.sql import open_prediction_log
from exporters.prediction_log.sql import LogUrlError, database_url, redact
from exporters.storage import StorageError
from tests.log_backends import backend, log_url_for, sql_log  # noqa: F401  (fixtures)


def _record(label="a", sha="ab" * 32, stored=True, at=1_700_000_000.0, version="v1") -> PredictionRecord:
    return PredictionRecord(prediction_id=new_record_id(at), created_at=at, model_version=version, label=label,
                            confidence=0.9, probabilities=[0.9, 0.1], image_sha256=sha, image_stored=stored,
                            filename="x.jpg", embedding=np.ones(4, np.float16).tobytes(), embedding_space="raw")


def _legacy_object(r: PredictionRecord) -> tuple[str, bytes]:
    """A record as cnnloop wrote it before the SQL log: one JSON object per record under its UTC date, embedding in base64."""
    day = datetime.fromtimestamp(r.created_at, tz=timezone.utc).strftime("%Y-%m-%d")
    body = {**asdict(r), "embedding": base64.b64encode(r.embedding).decode() if r.embedding is not None else None}
    return f"predictions/{day}/{r.prediction_id}.json", json.dumps(body).encode()


def test_record_ids_are_unique_and_carry_their_time():
    ids = {new_record_id(1_700_000_000.0) for _ in range(1000)}
    assert len(ids) == 1000
    assert record_time(next(iter(ids))) == 1_700_000_000.0


def test_a_record_reads_back_field_for_field(sql_log):
    rec = _record()
    sql_log.add_predictions([rec])
    assert sql_log.get_prediction(rec.prediction_id) == rec
    assert sql_log.get_prediction("0" * 32) is None


def test_feedback_latest_label_wins_and_repeats_are_idempotent(sql_log):
    rec = _record(label="a")
    sql_log.add_predictions([rec])
    first = sql_log.record_feedback(rec.prediction_id, "b")
    again = sql_log.record_feedback(rec.prediction_id, "b")
    last = sql_log.record_feedback(rec.prediction_id, "a")
    assert (first.changed, again.changed, last.changed) == (True, False, True)
    assert last.previous_label == "b"
    assert sql_log.get_prediction(rec.prediction_id).feedback_label == "a"
    assert sql_log.feedback_summary() == (1, 1)
    assert sql_log.record_feedback("0" * 32, "a") is None
    assert sql_log.label_changes([rec.prediction_id]).as_dict() == {"count": 2, "relabelled_predictions": 1}


def test_a_batch_retried_after_its_commit_lands_once(sql_log):
    records = [_record(sha=f"{i:064x}") for i in range(3)]
    sql_log.add_predictions(records)
    sql_log.add_predictions(records + [_record(sha="ff" * 32)])  # the writer's retry when a commit's answer was lost
    assert sql_log.count_predictions() == 4


def test_labeled_examples_name_their_source_and_unstored_feedback_is_counted(sql_log):
    rec, unstored = _record(sha="cd" * 32), _record(sha="ee" * 32, stored=False)
    sql_log.add_predictions([rec, unstored])
    sql_log.record_feedback(rec.prediction_id, "b")
    sql_log.record_feedback(unstored.prediction_id, "b")
    upload_id = sql_log.add_labeled_upload("ef" * 32, "a", "new.jpg")
    got = sorted((e.source, e.record_id, e.label) for e in sql_log.labeled_examples())
    assert got == sorted([(FEEDBACK, rec.prediction_id, "b"), (LABELED_UPLOAD, upload_id, "a")])
    assert sql_log.feedback_without_image() == 1  # reported, not silently lost


def test_label_changes_count_every_event_and_each_relabelled_prediction_once(sql_log):
    records = [_record(sha=f"{i:064x}") for i in range(1200)]  # more ids than one query takes
    sql_log.add_predictions(records)
    for label in ("b", "a", "b"):
        sql_log.record_feedback(records[0].prediction_id, label)
    sql_log.record_feedback(records[1100].prediction_id, "b")
    changes = sql_log.label_changes(r.prediction_id for r in records)
    assert (changes.count, changes.relabelled_predictions) == (4, 1)


T0 = 1_700_000_000.0
# The windows the drift check reads (drift_check in training/retrain/job.py, for `cnnloop drift` and
# the retrain job): the production version's last N, or since a time, or both.
WINDOWS = {
    "last_n_of_a_version": {"last": 5, "model_version": "v1"},
    "since_of_a_version": {"since": T0 + 150, "model_version": "v1"},
    "since_and_last_n_of_a_version": {"since": T0 + 150, "last": 5, "model_version": "v1"},
}


def _statements_sent(log, read) -> list[tuple[str, object]]:
    """The SQL text and parameters `read()` hands the database driver: the query as run, not as written here."""
    sent = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    event.listen(log.engine, "before_cursor_execute", capture)
    try:
        read()
    finally:
        event.remove(log.engine, "before_cursor_execute", capture)
    return [(sql, params) for sql, params in sent if "predictions" in sql]  # not SQLite's BEGIN


def _plan(log, statement: str, parameters) -> str:
    with log.engine.connect() as conn:
        if log.dialect == "sqlite":
            return " | ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters))
        # A few hundred rows fit one page, where a scan is cheaper; with scans priced out, the plan
        # says whether an index can serve the query at all.
        conn.exec_driver_sql("SET enable_seqscan = off")
        return " | ".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters))


@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_the_window_read_the_log_runs_walks_an_index_newest_first(sql_log, window):
    kwargs, index = WINDOWS[window], "predictions_model_window"
    sql_log.add_predictions([_record(sha=f"{i:064x}", at=T0 + i, version=("v1", "v2")[i % 2]) for i in range(300)])
    statements = _statements_sent(sql_log, lambda: sql_log.predictions(**kwargs))
    assert len(statements) == 1, statements
    plan = _plan(sql_log, *statements[0])
    assert index in plan, plan
    # The index bounds the rows read (SQLite's SEARCH, PostgreSQL's Index Cond): no pass over the whole log.
    assert re.search(rf"SEARCH predictions USING (COVERING )?INDEX {index}\b|Index Cond", plan), plan
    assert not re.search(r"\bSCAN predictions\b|Seq Scan", plan), plan
    if "last" in kwargs:
        # `last=N` reads N rows only if they come off the index newest-first; a sort reads the whole
        # window first. (A window without a limit is read whole anyway; PostgreSQL may sort it.)
        assert "TEMP B-TREE" not in plan, plan
        assert "Sort" not in plan, plan


def test_the_labeled_reads_the_log_runs_use_the_labeled_index(sql_log):
    records = [_record(sha=f"{i:064x}", at=T0 + i) for i in range(300)]
    sql_log.add_predictions(records)
    sql_log.record_feedback(records[0].prediction_id, "b")
    statements = _statements_sent(sql_log, lambda: (sql_log.feedback_summary(), sql_log.feedback_without_image(),
                                                    list(sql_log.labeled_examples())))
    labeled = [(sql, params) for sql, params in statements if "FROM predictions" in sql]  # not labeled_uploads
    assert len(labeled) == 3, statements
    for statement in labeled:
        plan = _plan(sql_log, *statement)
        assert "predictions_labeled" in plan, (statement[0], plan)


def test_replicas_writing_and_labeling_at_once_lose_and_overwrite_nothing(backend, request, tmp_path):
    url = log_url_for(request, backend)
    replicas = [open_prediction_log(str(tmp_path / "data"), log_url=url) for _ in range(3)]
    try:
        def write(i):
            rec = _record(sha=f"{i:064x}")
            replicas[i % 3].store_image(rec.image_sha256, b"same bytes")
            replicas[i % 3].add_predictions([rec])
            return rec.prediction_id

        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(write, range(60)))
        reader = replicas[0]
        assert all(reader.get_prediction(pid).image_sha256 == f"{i:064x}" for i, pid in enumerate(ids))
        assert reader.count_predictions() == 60
        # Twelve clients give one prediction the same first label through three replicas: one change, one event.
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(lambda i: replicas[i % 3].record_feedback(ids[0], "b"), range(12)))
        assert sum(o.changed for o in outcomes) == 1
        assert replicas[0].record_feedback(ids[0], "a").previous_label == "b"
        assert replicas[2].get_prediction(ids[0]).feedback_label == "a"
        assert reader.label_changes([ids[0]]).as_dict() == {"count": 2, "relabelled_predictions": 1}
    finally:
        for log in replicas:
            log.close()


def test_replicas_starting_at_once_on_an_empty_database_all_open_it(backend, request, tmp_path):
    url = log_url_for(request, backend)
    barrier = threading.Barrier(4)

    def open_one(_):
        barrier.wait()
        return open_prediction_log(str(tmp_path / "data"), log_url=url)

    with ThreadPoolExecutor(4) as pool:
        logs = list(pool.map(open_one, range(4)))
    logs[0].add_predictions([_record()])
    assert all(log.count_predictions() == 1 for log in logs)
    for log in logs:
        log.close()


def test_a_log_of_a_newer_schema_is_refused_not_written(sql_log, backend, request, tmp_path):
    with sql_log.engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}, newer than this cnnloop understands"):
        open_prediction_log(str(tmp_path / "data"), log_url=log_url_for(request, backend))


def test_a_sqlite_log_from_before_the_schema_table_opens_migrated_with_its_rows(tmp_path):
    # The layout as the service wrote it before the SQL log: no schema_version, labeled uploads in labeled_inputs(input_id).
    old = tmp_path / "predictions.sqlite3"
    with sqlite3.connect(old) as db:
        db.executescript("""
            CREATE TABLE predictions (prediction_id TEXT PRIMARY KEY, created_at REAL NOT NULL, model_version TEXT NOT NULL,
                label TEXT NOT NULL, confidence REAL NOT NULL, probabilities TEXT NOT NULL, image_sha256 TEXT NOT NULL,
                image_stored INTEGER NOT NULL, filename TEXT NOT NULL, embedding BLOB, embedding_space TEXT,
                feedback_label TEXT, feedback_at REAL);
            CREATE INDEX predictions_created ON predictions(created_at);
            CREATE TABLE labeled_inputs (input_id TEXT PRIMARY KEY, created_at REAL NOT NULL,
                image_sha256 TEXT NOT NULL, label TEXT NOT NULL, filename TEXT NOT NULL);""")
        db.execute("INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   ("2" * 32, 1_700_000_000.0, "v1", "a", 0.9, "[0.9, 0.1]", "cd" * 32, 1, "p.jpg", None, None, "b", 1_700_000_001.0))
        db.execute("INSERT INTO labeled_inputs VALUES (?, ?, ?, ?, ?)", ("1" * 32, 1_700_000_000.0, "ab" * 32, "a", "old.jpg"))
    db.close()
    log = open_prediction_log(str(tmp_path))
    new_id = log.add_labeled_upload("cd" * 32, "b", "new.jpg")
    log.close()
    again = open_prediction_log(str(tmp_path))  # a second open finds the log already migrated
    got = sorted((e.source, e.record_id, e.label) for e in again.labeled_examples())
    assert got == sorted([(LABELED_UPLOAD, "1" * 32, "a"), (LABELED_UPLOAD, new_id, "b"), (FEEDBACK, "2" * 32, "b")])
    again.close()
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert {"predictions_model_window", "predictions_labeled", "feedback_events_prediction"} <= indexes
    assert "predictions_created" not in indexes


def test_images_on_s3_with_records_in_postgresql(postgres_url, s3_bucket):
    log = open_prediction_log(s3_bucket.uri("svc"), endpoint_url=s3_bucket.endpoint_url, log_url=postgres_url)
    try:
        rec = _record(sha="ab" * 32)
        log.store_image(rec.image_sha256, b"jpeg bytes")
        log.add_predictions([rec])
        log.record_feedback(rec.prediction_id, "b")
        [example] = log.labeled_examples()
        assert log.image_bytes(example.image_sha256) == b"jpeg bytes"
    finally:
        log.close()


def test_log_url_errors_name_the_fix_and_never_show_the_password():
    with pytest.raises(LogUrlError, match="CNNLOOP_LOG_URL") as e:
        database_url("s3://bucket/svc", None)
    assert "postgresql://" in str(e.value)
    with pytest.raises(LogUrlError, match="postgresql://user:password@host:5432/dbname") as e:
        database_url("./data", "mysql://u:hunter2@db/x")
    assert "hunter2" not in str(e.value)
    assert database_url("./data", "postgresql://u:p@db:5432/x") == "postgresql+psycopg://u:p@db:5432/x"
    assert "hunter2" not in redact("postgresql+psycopg://u:hunter2@db/x")


def test_an_unreachable_database_is_a_storage_error_naming_the_url_without_password(tmp_path):
    from training.demo.service_process import free_port

    url = f"postgresql://cnnloop:hunter2@127.0.0.1:{free_port()}/cnnloop?connect_timeout=5"
    with pytest.raises(StorageError, match="cannot open the prediction log .*check CNNLOOP_LOG_URL") as e:
        open_prediction_log(str(tmp_path), log_url=url)
    assert "hunter2" not in str(e.value)


def test_a_legacy_s3_log_moves_into_the_database_once(sql_log, s3_bucket):
    from exporters.prediction_log.legacy_s3 import import_legacy_s3_log
    from exporters.storage import open_store

    store = open_store(s3_bucket.uri("svc"), endpoint_url=s3_bucket.endpoint_url)
    recs = [_record(sha=f"{i:064x}") for i in range(3)]
    for r in recs:  # the layout cnnloop wrote before the SQL log: one object per record
        store.put_if_absent(*_legacy_object(r))
    pid = recs[0].prediction_id
    for ns, (label, prev) in enumerate([("b", None), ("a", "b")]):
        event = {"prediction_id": pid, "label": label, "previous_label": prev, "at": 1_700_000_010.0 + ns}
        store.put_if_absent(f"feedback/{pid}/{ns:020d}-abcd.json", json.dumps(event).encode())
    old_upload = {"input_id": "1" * 32, "created_at": 1_700_000_000.0, "image_sha256": "ab" * 32, "label": "a", "filename": "o.jpg"}
    store.put_if_absent(f"labeled/2023-11-14/{'1' * 32}.json", json.dumps(old_upload).encode())

    counts = import_legacy_s3_log(store, sql_log)
    assert (counts.predictions, counts.feedback_events, counts.labeled_uploads, counts.skipped) == (3, 2, 1, 0)
    assert sql_log.get_prediction(pid).feedback_label == "a"
    assert sql_log.label_changes([pid]).as_dict() == {"count": 2, "relabelled_predictions": 1}
    assert sorted(e.source for e in sql_log.labeled_examples()) == [FEEDBACK, LABELED_UPLOAD]
    again = import_legacy_s3_log(store, sql_log)  # an interrupted import is finished by running it again
    assert (again.predictions, again.feedback_events, again.labeled_uploads, again.skipped) == (0, 0, 0, 4)
    assert sql_log.count_predictions() == 3


def test_cnnloop_log_import_s3_then_info_as_a_user_types_them(postgres_url, s3_bucket, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from exporters.storage import open_store

    store = open_store(s3_bucket.uri("svc"), endpoint_url=s3_bucket.endpoint_url)
    recs = [_record(sha=f"{i:064x}") for i in range(5)]
    for r in recs:
        store.put_if_absent(*_legacy_object(r))
    cnnloop = str(Path(sys.executable).parent / "cnnloop")
    flags = ["--data-dir", s3_bucket.uri("svc"), "--s3-endpoint-url", s3_bucket.endpoint_url]
    env = {**os.environ, "CNNLOOP_LOG_URL": postgres_url}

    imported = subprocess.run([cnnloop, "log", "import-s3", *flags, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["predictions"] == 5
    shown = subprocess.run([cnnloop, "log", "info", *flags, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["predictions"] == 5 and info["schema_version"] == SCHEMA_VERSION
    assert postgres_url.split("@")[-1] in info["database"]
    no_url = subprocess.run([cnnloop, "log", "info", *flags], env={k: v for k, v in env.items() if k != "CNNLOOP_LOG_URL"},
                            capture_output=True, text=True, timeout=120)
    assert no_url.returncode == 2 and "CNNLOOP_LOG_URL" in no_url.stderr
