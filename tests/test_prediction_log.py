"""The prediction log (exporters.prediction_log) on its own: record ids, feedback, replicas, old layouts."""
from __future__ import annotations

import json
import sqlite3

import numpy as np

from exporters.prediction_log import (FEEDBACK, LABELED_UPLOAD, PredictionRecord, SqlitePredictionLog, new_record_id,
                                      record_date)


def _record(label="a", sha="ab" * 32) -> PredictionRecord:
    now = 1_700_000_000.0
    return PredictionRecord(prediction_id=new_record_id(now), created_at=now, model_version="v1", label=label,
                            confidence=0.9, probabilities=[0.9, 0.1], image_sha256=sha, image_stored=True,
                            filename="x.jpg", embedding=np.ones(4, np.float16).tobytes(), embedding_space="raw")


def test_record_ids_are_unique_and_carry_their_date():
    ids = {new_record_id(1_700_000_000.0) for _ in range(1000)}
    assert len(ids) == 1000
    assert record_date(next(iter(ids))) == "2023-11-14"


def test_sqlite_log_feedback_latest_label_wins_and_repeats_are_idempotent(tmp_path):
    log = SqlitePredictionLog(tmp_path)
    rec = _record(label="a")
    log.add_predictions([rec])
    first = log.record_feedback(rec.prediction_id, "b")
    again = log.record_feedback(rec.prediction_id, "b")
    last = log.record_feedback(rec.prediction_id, "a")
    assert (first.changed, again.changed, last.changed) == (True, False, True)
    assert last.previous_label == "b"
    assert log.get_prediction(rec.prediction_id).feedback_label == "a"
    assert log.feedback_summary() == (1, 1)
    assert log.record_feedback("0" * 32, "a") is None
    n_events = log._db.execute("SELECT COUNT(*) FROM feedback_events").fetchone()[0]
    assert n_events == 2
    log.close()


def test_sqlite_log_is_in_wal_mode_and_survives_reopen(tmp_path):
    log = SqlitePredictionLog(tmp_path)
    rec = _record()
    log.add_predictions([rec])
    log.record_feedback(rec.prediction_id, "b")
    assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    log.close()
    again = SqlitePredictionLog(tmp_path)
    assert again.get_prediction(rec.prediction_id).feedback_label == "b"
    again.close()


def test_labeled_examples_name_their_source_feedback_or_labeled_upload(tmp_path):
    log = SqlitePredictionLog(tmp_path)
    rec = _record(sha="cd" * 32)
    log.add_predictions([rec])
    log.record_feedback(rec.prediction_id, "b")
    upload_id = log.add_labeled_upload("ef" * 32, "a", "new.jpg")
    got = sorted((e.source, e.record_id, e.label) for e in log.labeled_examples())
    assert got == sorted([(FEEDBACK, rec.prediction_id, "b"), (LABELED_UPLOAD, upload_id, "a")])
    log.close()


def test_label_changes_count_every_event_and_each_relabelled_prediction_once(tmp_path):
    log = SqlitePredictionLog(tmp_path)
    records = [_record(sha=f"{i:064x}") for i in range(1200)]  # more ids than one query takes
    log.add_predictions(records)
    for label in ("b", "a", "b"):
        log.record_feedback(records[0].prediction_id, label)
    log.record_feedback(records[1100].prediction_id, "b")
    changes = log.label_changes(r.prediction_id for r in records)
    assert (changes.count, changes.relabelled_predictions) == (4, 1)
    assert log.label_changes([records[1100].prediction_id]).as_dict() == {"count": 1, "relabelled_predictions": 0}
    log.close()


def test_a_sqlite_log_written_before_labeled_uploads_had_that_name_still_loads(tmp_path):
    # The layout as the service wrote it before the rename: labeled uploads in labeled_inputs(input_id).
    with sqlite3.connect(tmp_path / "predictions.sqlite3") as db:
        db.execute("CREATE TABLE labeled_inputs (input_id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
                   "image_sha256 TEXT NOT NULL, label TEXT NOT NULL, filename TEXT NOT NULL)")
        db.execute("INSERT INTO labeled_inputs VALUES (?, ?, ?, ?, ?)", ("1" * 32, 1_700_000_000.0, "ab" * 32, "a", "old.jpg"))
    db.close()
    log = SqlitePredictionLog(tmp_path)
    new_id = log.add_labeled_upload("cd" * 32, "b", "new.jpg")
    log.close()
    again = SqlitePredictionLog(tmp_path)  # a second open finds the log already migrated
    got = sorted((e.source, e.record_id, e.image_sha256, e.label) for e in again.labeled_examples())
    assert got == sorted([(LABELED_UPLOAD, "1" * 32, "ab" * 32, "a"), (LABELED_UPLOAD, new_id, "cd" * 32, "b")])
    again.close()


def test_an_s3_labeled_upload_written_before_the_rename_still_loads(s3_bucket):
    from exporters.prediction_log import S3PredictionLog
    from exporters.storage import open_store

    store = open_store(s3_bucket.uri("svc"), endpoint_url=s3_bucket.endpoint_url)
    old = {"input_id": "1" * 32, "created_at": 1_700_000_000.0, "image_sha256": "ab" * 32, "label": "a", "filename": "old.jpg"}
    store.put_if_absent(f"labeled/2023-11-14/{'1' * 32}.json", json.dumps(old).encode())
    log = S3PredictionLog(store)
    new_id = log.add_labeled_upload("cd" * 32, "b", "new.jpg")
    got = sorted((e.source, e.record_id, e.label) for e in log.labeled_examples())
    assert got == sorted([(LABELED_UPLOAD, "1" * 32, "a"), (LABELED_UPLOAD, new_id, "b")])


def test_s3_log_replicas_writing_at_once_lose_and_overwrite_nothing(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto import mock_aws

    from exporters.storage import open_store
    from exporters.prediction_log import S3PredictionLog

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="loop")
        replicas = [S3PredictionLog(open_store("s3://loop/service")) for _ in range(3)]

        def write(i):
            log = replicas[i % 3]
            rec = _record(sha=f"{i:064x}")
            log.store_image(rec.image_sha256, b"same bytes")
            log.add_predictions([rec])
            return rec.prediction_id

        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(write, range(60)))
        reader = replicas[0]
        assert all(reader.get_prediction(pid).image_sha256 == f"{i:064x}" for i, pid in enumerate(ids))
        assert len([k for k in reader.store.list("predictions") if k.endswith(".json")]) == 60
        assert reader.store.list("predictions")[0].startswith("predictions/2023-11-14/")

        pid = ids[0]
        assert replicas[1].record_feedback(pid, "b").changed
        assert not replicas[2].record_feedback(pid, "b").changed  # idempotent across replicas
        assert replicas[0].record_feedback(pid, "a").previous_label == "b"
        assert replicas[2].get_prediction(pid).feedback_label == "a"
        assert replicas[0].record_feedback("f" * 32, "a") is None
        assert [(e.label, e.source) for e in reader.labeled_examples()] == [("a", "feedback")]
