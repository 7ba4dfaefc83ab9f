"""The review queue (exporters.prediction_log.review_queue) and its acquisition scores, on SQLite and a
real PostgreSQL: what is queued and in which order, leases two replicas never share, answers that land
as feedback (and refused ones that change nothing), second looks, and a version-1 log migrated in place."""
from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sqlalchemy import (Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text, create_engine,
                        insert, inspect, select)

from exporters.calibration import Calibration
from exporters.prediction_log import schema
from exporters.prediction_log.acquisition import (acquisition_scores, entropy_scores, margin_scores, novelty_scores,
                                                  random_scores, spread_batch)
from exporters.prediction_log.records import FEEDBACK, REVIEW, PredictionRecord, encode_embedding, new_record_id
from exporters.prediction_log.review_queue import ABSTAINED, LABEL_CHECK, QueueState, ReviewError, ReviewQueue
from exporters.prediction_log.sql import database_url, open_prediction_log
from tests.log_backends import backend, log_url_for, sql_log  # noqa: F401  (fixtures)

T0 = 1_700_000_000.0
CLASSES = "abc"
HOUR = 3600.0
SHORT = 0.2  # a lease meant to run out: the tests sleep past it, never time anything


def _record(probs=(0.6, 0.4), version="v1", stored=True, embedding=None, at=T0) -> PredictionRecord:
    probs = [float(p) for p in probs]
    return PredictionRecord(prediction_id=new_record_id(at), created_at=at, model_version=version,
                            label=CLASSES[int(np.argmax(probs))], confidence=max(probs), probabilities=probs,
                            image_sha256=secrets.token_hex(32), image_stored=stored, filename="x.jpg",
                            embedding=encode_embedding(embedding), embedding_space=None if embedding is None else "raw")


def _queued(log, records: list[PredictionRecord], strategy: str = "margin") -> ReviewQueue:
    log.add_predictions(records)
    queue = ReviewQueue(log)
    assert queue.refill("v1", strategy) == len(records)
    return queue


def _logged(log, prediction_id: str):
    """Everything the log holds about one prediction: its row, its feedback events, its queue item."""
    e, r = schema.feedback_events, schema.review_items
    with log.engine.connect() as conn:
        events = [tuple(row) for row in conn.execute(select(e).where(e.c.prediction_id == prediction_id).order_by(e.c.id))]
        item = conn.execute(select(r).where(r.c.prediction_id == prediction_id)).first()
    return log.get_prediction(prediction_id), events, None if item is None else tuple(item)


def _events(log, prediction_id: str) -> list[tuple]:
    e = schema.feedback_events
    with log.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(select(e.c.label, e.c.previous_label, e.c.source, e.c.reviewer)
                                                   .where(e.c.prediction_id == prediction_id).order_by(e.c.id))]


def _clusters(n_clusters: int, size: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of `n_clusters` distinct images, `size` near-copies each, and each copy's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    cluster = np.repeat(np.arange(n_clusters), size)
    return centres[cluster] + rng.normal(scale=1e-3, size=(n_clusters * size, dim)), cluster


# acquisition: pure scores ----------------------------------------------------------------------

def test_margin_ranks_the_closest_call_first():
    probs = np.array([[0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [0.7, 0.2, 0.1]])
    assert list(np.argsort(-margin_scores(probs))) == [1, 2, 0]


def test_entropy_ranks_the_most_uncertain_first():
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.8, 0.1, 0.1]])
    scores = entropy_scores(probs)
    assert list(np.argsort(-scores)) == [1, 2, 0]
    assert scores[1] == pytest.approx(np.log(3))


def test_novelty_ranks_an_embedding_far_from_the_reference_first():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 8))
    embeddings = np.stack([reference[3] + 0.01, reference.mean(0), reference.mean(0) + 20.0])
    assert list(np.argsort(-novelty_scores(embeddings, reference))) == [2, 1, 0]


def test_random_scores_are_seeded_and_do_not_depend_on_order():
    ids = [new_record_id() for _ in range(20)]
    scores = random_scores(ids, seed=7)
    assert list(random_scores(ids[::-1], seed=7)) == list(scores[::-1])
    assert not np.array_equal(random_scores(ids, seed=8), scores)
    assert ((scores >= 0) & (scores < 1)).all()


def test_unknown_strategies_and_novelty_without_a_reference_are_refused():
    probs = np.array([[0.6, 0.4]])
    with pytest.raises(ValueError, match="unknown acquisition strategy 'smart'"):
        acquisition_scores("smart", ["x"], probs)
    with pytest.raises(ValueError, match="reference sample"):
        acquisition_scores("novelty", ["x"], probs, embeddings=np.ones((1, 4)), reference=None)


def test_spread_batch_takes_one_of_each_cluster_before_a_second_of_any():
    embeddings, cluster = _clusters(n_clusters=4, size=5)
    # Cluster 0 holds the five best scores: a top-k batch would be cluster 0 only.
    scores = np.where(cluster == 0, 0.95, 0.6) + np.random.default_rng(1).uniform(0, 0.02, len(cluster))
    picked = spread_batch(scores, embeddings, 6)
    assert sorted(cluster[picked[:4]]) == [0, 1, 2, 3]
    assert picked[0] == int(np.argmax(scores))


def test_twenty_near_copies_of_one_image_are_not_handed_out_together():
    copies, _ = _clusters(n_clusters=1, size=20, seed=2)
    others, _ = _clusters(n_clusters=6, size=1, seed=3)
    scores = np.concatenate([np.full(20, 0.9), np.linspace(0.5, 0.7, 6)])
    picked = spread_batch(scores, np.concatenate([copies, others]), 5)
    assert sum(i < 20 for i in picked) == 1


def test_without_embeddings_a_batch_is_the_top_scores():
    assert spread_batch(np.array([0.1, 0.9, 0.5, 0.7]), None, 2) == [1, 3]


# filling the queue -----------------------------------------------------------------------------

def test_the_queue_holds_only_unlabeled_predictions_of_the_version_with_a_stored_image(sql_log):
    wanted = _record()
    labeled, unstored, other_version = _record(), _record(stored=False), _record(version="v2")
    sql_log.add_predictions([wanted, labeled, unstored, other_version])
    sql_log.record_feedback(labeled.prediction_id, "b")
    queue = ReviewQueue(sql_log)
    assert [r.prediction_id for r in queue.candidates("v1", 100)] == [wanted.prediction_id]
    assert queue.refill("v1", "margin") == 1
    items, _ = queue.lease("ann", 10, HOUR)
    assert [item.prediction.prediction_id for item in items] == [wanted.prediction_id]


def test_refill_puts_abstained_predictions_before_higher_scored_confident_ones(sql_log):
    abstained = _record(probs=(0.5, 0.25, 0.25))  # margin score 0.75, below the 0.55 confidence the rule wants
    close_call = _record(probs=(0.6, 0.4, 0.0))  # margin score 0.8: the higher score, but answered
    confident = _record(probs=(0.9, 0.05, 0.05))
    sql_log.add_predictions([confident, close_call, abstained])
    queue = ReviewQueue(sql_log)
    assert queue.refill("v1", "margin", calibration=Calibration(abstain_below_confidence=0.55)) == 3
    items, _ = queue.lease("ann", 3, HOUR, spread=False)
    assert [item.prediction.prediction_id for item in items] == [abstained.prediction_id, close_call.prediction_id,
                                                                  confident.prediction_id]
    assert [item.reason for item in items] == [ABSTAINED, None, None]


def test_refill_twice_queues_nothing_twice(sql_log):
    records = [_record(probs=(p, 1 - p)) for p in (0.5, 0.7, 0.9)]
    queue = _queued(sql_log, records)
    assert queue.refill("v1", "margin") == 0
    assert queue.enqueue([(records[0].prediction_id, 5.0, "margin", None)]) == 0
    assert queue.state().waiting == 3
    items, _ = queue.lease("ann", 10, HOUR)
    assert sorted(item.prediction.prediction_id for item in items) == sorted(r.prediction_id for r in records)


def test_a_lease_spreads_a_batch_over_near_copies(sql_log):
    copies, _ = _clusters(n_clusters=1, size=20, seed=2)
    others, _ = _clusters(n_clusters=6, size=1, seed=3)
    near_copies = [_record(probs=(0.51, 0.49), embedding=e) for e in copies]  # the closest calls, 20 times over
    distinct = [_record(probs=(p, 1 - p), embedding=e) for p, e in zip(np.linspace(0.6, 0.7, 6), others)]
    queue = _queued(sql_log, near_copies + distinct)
    items, _ = queue.lease("ann", 5, HOUR)
    copy_ids = {r.prediction_id for r in near_copies}
    assert sum(item.prediction.prediction_id in copy_ids for item in items) == 1


# leases ----------------------------------------------------------------------------------------

def test_two_replicas_leasing_at_once_never_hand_out_one_prediction_twice(backend, request, tmp_path):
    url = log_url_for(request, backend)
    replicas = [open_prediction_log(str(tmp_path / "data"), log_url=url) for _ in range(2)]
    try:
        rng = np.random.default_rng(0)
        # More items than the 4 x 10 x 3 asked for, so no lease comes back short for want of free rows.
        _queued(replicas[0], [_record(probs=(p, 1 - p), embedding=rng.normal(size=8)) for p in rng.uniform(0.5, 1, 200)])
        queues = [ReviewQueue(log) for log in replicas]
        barrier = threading.Barrier(4)

        def reviewer(i: int) -> list[tuple[str, str]]:
            barrier.wait()
            got = []
            for _ in range(10):
                items, _ = queues[i % 2].lease(f"reviewer-{i}", 3, HOUR)
                got += [(item.prediction.prediction_id, item.lease_id) for item in items]
            return got

        with ThreadPoolExecutor(4) as pool:
            handed = [pair for got in pool.map(reviewer, range(4)) for pair in got]
        ids = [pid for pid, _ in handed]
        assert len(ids) == 120
        assert len(set(ids)) == len(ids), "one prediction was leased to two reviewers at once"
        assert all(queues[1].held_prediction(lease_id, pid) is not None for pid, lease_id in handed)
        assert queues[0].state().as_dict() == {"waiting": 80, "leased": 120, "labeled": 0, "skipped": 0, "expired_leases": 0}
    finally:
        for log in replicas:
            log.close()


def test_a_lease_skips_the_items_another_replica_is_leasing_instead_of_waiting(postgres_url, tmp_path):
    # lock_timeout turns a lease that waited for the other replica's row lock into an error, not a hang.
    url = postgres_url + "?options=-c%20lock_timeout%3D5s"
    leasing, reviewing = (open_prediction_log(str(tmp_path / "data"), log_url=url) for _ in range(2))
    try:
        top, second = _record(probs=(0.5, 0.5)), _record(probs=(0.7, 0.3))
        queue = _queued(leasing, [top, second])
        r = schema.review_items
        with leasing.engine.connect() as conn, conn.begin():
            # The other replica's lease transaction, caught holding the top item.
            conn.execute(select(r).where(r.c.prediction_id == top.prediction_id).with_for_update())
            items, _ = ReviewQueue(reviewing).lease("bob", 2, HOUR)
        assert [item.prediction.prediction_id for item in items] == [second.prediction_id]
        assert [item.prediction.prediction_id for item in queue.lease("ann", 2, HOUR)[0]] == [top.prediction_id]
    finally:
        leasing.close()
        reviewing.close()


def test_an_expired_lease_returns_its_items_and_the_next_lease_reports_them(sql_log):
    records = [_record(probs=(p, 1 - p)) for p in (0.5, 0.6, 0.9)]
    queue = _queued(sql_log, records)
    first, expired = queue.lease("ann", 2, SHORT, spread=False)
    assert expired == 0
    time.sleep(SHORT * 2)
    assert queue.state().expired_leases == 2
    again, expired = queue.lease("bob", 3, HOUR, spread=False)
    assert [item.prediction.prediction_id for item in again[:2]] == [item.prediction.prediction_id for item in first]
    assert (len(again), expired) == (3, 2)


def test_a_leased_item_is_not_leased_again_while_the_lease_lasts(sql_log):
    queue = _queued(sql_log, [_record()])
    assert len(queue.lease("ann", 1, HOUR)[0]) == 1
    assert queue.lease("bob", 1, HOUR) == ([], 0)


# answers ---------------------------------------------------------------------------------------

def test_a_review_label_lands_as_feedback_with_its_source_and_reviewer(sql_log):
    rec = _record(probs=(0.6, 0.4))
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, HOUR)
    answer = queue.answer(item.lease_id, rec.prediction_id, "b", reviewer="ann")
    assert (answer.outcome, answer.label, answer.predicted_label, answer.changed) == ("labeled", "b", "a", True)
    stored = sql_log.get_prediction(rec.prediction_id)
    assert stored.feedback_label == "b" and stored.feedback_at is not None
    assert _events(sql_log, rec.prediction_id) == [("b", None, REVIEW, "ann")]
    # The retrain job reads labeled examples: a review label is one, as any feedback is.
    assert [(e.source, e.record_id, e.label) for e in sql_log.labeled_examples()] == [(FEEDBACK, rec.prediction_id, "b")]


def test_feedback_from_post_feedback_keeps_its_own_source(sql_log):
    rec = _record()
    sql_log.add_predictions([rec])
    sql_log.record_feedback(rec.prediction_id, "b")
    assert _events(sql_log, rec.prediction_id) == [("b", None, FEEDBACK, None)]


def test_a_skip_records_no_label(sql_log):
    rec = _record()
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, HOUR)
    answer = queue.answer(item.lease_id, rec.prediction_id, None, reviewer="ann")
    assert (answer.outcome, answer.label, answer.changed) == ("skipped", None, False)
    assert sql_log.get_prediction(rec.prediction_id).feedback_label is None
    assert _events(sql_log, rec.prediction_id) == []
    assert list(sql_log.labeled_examples()) == []
    assert queue.lease("bob", 1, HOUR) == ([], 0)  # a skipped item is answered: not handed out again


def _refused(queue: ReviewQueue, kind: str, call) -> None:
    with pytest.raises(ReviewError) as e:
        call()
    assert e.value.kind == kind, str(e.value)


def test_an_answer_on_another_reviewers_lease_is_refused_and_changes_nothing(sql_log):
    mine, theirs = _record(), _record()
    queue = _queued(sql_log, [mine, theirs])
    [item], _ = queue.lease("ann", 1, HOUR, spread=False)
    [other], _ = queue.lease("bob", 1, HOUR, spread=False)
    before = _logged(sql_log, other.prediction.prediction_id)
    _refused(queue, "foreign_lease", lambda: queue.answer(item.lease_id, other.prediction.prediction_id, "b"))
    _refused(queue, "foreign_lease", lambda: queue.answer("f" * 24, other.prediction.prediction_id, "b"))
    assert _logged(sql_log, other.prediction.prediction_id) == before
    _refused(queue, "foreign_lease", lambda: queue.undo(item.lease_id, other.prediction.prediction_id, HOUR))
    assert _logged(sql_log, other.prediction.prediction_id) == before


def test_an_answer_after_the_lease_expired_is_refused_and_changes_nothing(sql_log):
    rec = _record()
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, SHORT)
    time.sleep(SHORT * 2)
    before = _logged(sql_log, rec.prediction_id)
    _refused(queue, "lease_expired", lambda: queue.answer(item.lease_id, rec.prediction_id, "b"))
    assert _logged(sql_log, rec.prediction_id) == before
    # Once another reviewer holds it, the old lease is someone else's item.
    [again], expired = queue.lease("bob", 1, HOUR)
    assert (again.prediction.prediction_id, expired) == (rec.prediction_id, 1)
    held = _logged(sql_log, rec.prediction_id)
    _refused(queue, "foreign_lease", lambda: queue.answer(item.lease_id, rec.prediction_id, "b"))
    assert _logged(sql_log, rec.prediction_id) == held


def test_a_second_answer_is_refused_and_changes_nothing(sql_log):
    rec = _record()
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, HOUR)
    queue.answer(item.lease_id, rec.prediction_id, "b")
    before = _logged(sql_log, rec.prediction_id)
    _refused(queue, "already_answered", lambda: queue.answer(item.lease_id, rec.prediction_id, "c"))
    _refused(queue, "already_answered", lambda: queue.answer(item.lease_id, rec.prediction_id, None))
    assert _logged(sql_log, rec.prediction_id) == before
    assert sql_log.get_prediction(rec.prediction_id).feedback_label == "b"


def test_an_answer_on_a_prediction_never_queued_is_refused_and_changes_nothing(sql_log):
    queued, never = _record(), _record()
    queue = _queued(sql_log, [queued])
    sql_log.add_predictions([never])
    [item], _ = queue.lease("ann", 1, HOUR)
    before = _logged(sql_log, never.prediction_id)
    _refused(queue, "not_queued", lambda: queue.answer(item.lease_id, never.prediction_id, "b"))
    _refused(queue, "not_queued", lambda: queue.answer(item.lease_id, "0" * 32, "b"))
    assert _logged(sql_log, never.prediction_id) == before
    assert sql_log.get_prediction("0" * 32) is None and _events(sql_log, "0" * 32) == []


def test_undo_of_an_unanswered_item_is_refused_and_changes_nothing(sql_log):
    rec = _record()
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, HOUR)
    before = _logged(sql_log, rec.prediction_id)
    _refused(queue, "not_answered", lambda: queue.undo(item.lease_id, rec.prediction_id, HOUR))
    assert _logged(sql_log, rec.prediction_id) == before


def test_undo_reopens_an_answer_and_a_new_one_is_a_label_change(sql_log):
    rec = _record()
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, HOUR)
    queue.answer(item.lease_id, rec.prediction_id, "b", reviewer="ann")
    reopened = queue.undo(item.lease_id, rec.prediction_id, HOUR)
    assert reopened.prediction.feedback_label == "b"  # the label stays until a new answer replaces it
    answer = queue.answer(item.lease_id, rec.prediction_id, "c", reviewer="ann")
    assert (answer.changed, answer.previous_label) == (True, "b")
    assert sql_log.get_prediction(rec.prediction_id).feedback_label == "c"
    assert _events(sql_log, rec.prediction_id) == [("b", None, REVIEW, "ann"), ("c", "b", REVIEW, "ann")]
    assert sql_log.label_changes([rec.prediction_id]).as_dict() == {"count": 2, "relabelled_predictions": 1}


# second looks ----------------------------------------------------------------------------------

def test_send_back_puts_answered_items_in_front_with_their_label_untouched(sql_log):
    records = [_record(probs=(p, 1 - p)) for p in (0.5, 0.55, 0.6, 0.95)]
    queue = _queued(sql_log, records)
    [first], _ = queue.lease("ann", 1, HOUR, spread=False)
    queue.answer(first.lease_id, first.prediction.prediction_id, "b", reviewer="ann")
    last = records[3]  # the confident one: last in the queue by score
    sql_log.record_feedback(last.prediction_id, "a")  # labeled by POST /feedback, never queued by refill
    events_before = {pid: _events(sql_log, pid) for pid in (first.prediction.prediction_id, last.prediction_id)}
    assert queue.send_back([last.prediction_id, first.prediction.prediction_id]) == 2
    items, _ = queue.lease("bob", 2, HOUR)
    assert {item.prediction.prediction_id for item in items} == {first.prediction.prediction_id, last.prediction_id}
    assert {item.reason for item in items} == {LABEL_CHECK}
    assert sql_log.get_prediction(first.prediction.prediction_id).feedback_label == "b"
    assert sql_log.get_prediction(last.prediction_id).feedback_label == "a"
    assert {pid: _events(sql_log, pid) for pid in events_before} == events_before


def test_a_second_look_that_confirms_the_label_adds_no_event(sql_log):
    rec = _record()
    queue = _queued(sql_log, [rec])
    [item], _ = queue.lease("ann", 1, HOUR)
    queue.answer(item.lease_id, rec.prediction_id, "b", reviewer="ann")
    queue.send_back([rec.prediction_id])
    [again], _ = queue.lease("bob", 1, HOUR)
    answer = queue.answer(again.lease_id, rec.prediction_id, "b", reviewer="bob")
    assert (answer.changed, answer.previous_label) == (False, "b")
    assert _events(sql_log, rec.prediction_id) == [("b", None, REVIEW, "ann")]


# state -----------------------------------------------------------------------------------------

def test_queue_state_counts_after_a_scripted_sequence(sql_log):
    queue = _queued(sql_log, [_record(probs=(p, 1 - p)) for p in (0.50, 0.52, 0.54, 0.56, 0.58, 0.60)])
    assert queue.state() == QueueState(waiting=6, leased=0, labeled=0, skipped=0, expired_leases=0)
    ann, _ = queue.lease("ann", 2, HOUR, spread=False)
    queue.answer(ann[0].lease_id, ann[0].prediction.prediction_id, "b")
    queue.answer(ann[1].lease_id, ann[1].prediction.prediction_id, None)
    queue.lease("bob", 2, SHORT, spread=False)
    time.sleep(SHORT * 2)
    _, expired = queue.lease("cy", 1, HOUR, spread=False)  # takes one of bob's, expired
    assert expired == 1
    # waiting: bob's other (expired) + two never leased; leased: cy's one.
    assert queue.state() == QueueState(waiting=3, leased=1, labeled=1, skipped=1, expired_leases=1)


# migration -------------------------------------------------------------------------------------

def _version_1_tables() -> MetaData:
    """The log's tables as schema.py defined them at SCHEMA_VERSION 1 (before the review queue)."""
    md = MetaData()
    predictions = Table(
        "predictions", md,
        Column("prediction_id", String(32), primary_key=True), Column("created_at", Float(53), nullable=False),
        Column("model_version", Text, nullable=False), Column("label", Text, nullable=False),
        Column("confidence", Float(53), nullable=False), Column("probabilities", Text, nullable=False),
        Column("image_sha256", String(64), nullable=False), Column("image_stored", Integer, nullable=False),
        Column("filename", Text, nullable=False), Column("embedding", LargeBinary), Column("embedding_space", Text),
        Column("feedback_label", Text), Column("feedback_at", Float(53)))
    events = Table(
        "feedback_events", md,
        Column("id", Integer, primary_key=True, autoincrement=True), Column("prediction_id", String(32), nullable=False),
        Column("label", Text, nullable=False), Column("previous_label", Text), Column("at", Float(53), nullable=False),
        sqlite_autoincrement=True)
    uploads = Table(
        "labeled_uploads", md,
        Column("upload_id", String(32), primary_key=True), Column("created_at", Float(53), nullable=False),
        Column("image_sha256", String(64), nullable=False), Column("label", Text, nullable=False),
        Column("filename", Text, nullable=False))
    Table("schema_version", md, Column("version", Integer, nullable=False))
    Index("predictions_model_window", predictions.c.model_version, predictions.c.created_at, predictions.c.prediction_id)
    Index("predictions_window", predictions.c.created_at, predictions.c.prediction_id)
    Index("predictions_labeled", predictions.c.feedback_at, sqlite_where=predictions.c.feedback_label.isnot(None),
          postgresql_where=predictions.c.feedback_label.isnot(None))
    Index("feedback_events_prediction", events.c.prediction_id)
    Index("labeled_uploads_created", uploads.c.created_at)
    return md


def test_a_version_1_log_opens_migrated_with_its_rows_and_takes_reviews(backend, request, tmp_path):
    data_dir, url = tmp_path / "data", log_url_for(request, backend)
    data_dir.mkdir()
    labeled, unlabeled = _record(), _record(probs=(0.55, 0.45))
    labeled.feedback_label, labeled.feedback_at = "b", T0 + 1
    v1 = _version_1_tables()
    engine = create_engine(database_url(str(data_dir), url))
    with engine.begin() as conn:
        v1.create_all(conn)
        for rec in (labeled, unlabeled):
            conn.execute(insert(v1.tables["predictions"]).values(
                **{**rec.__dict__, "probabilities": str(rec.probabilities), "image_stored": 1}))
        conn.execute(insert(v1.tables["feedback_events"]).values(prediction_id=labeled.prediction_id, label="b",
                                                                 previous_label=None, at=T0 + 1))
        conn.execute(insert(v1.tables["schema_version"]).values(version=1))
    engine.dispose()

    log = open_prediction_log(str(data_dir), log_url=url)
    try:
        with log.engine.connect() as conn:
            assert conn.execute(select(schema.schema_version.c.version)).scalars().all() == [schema.SCHEMA_VERSION]
            assert "review_items" in inspect(conn).get_table_names()
        assert log.get_prediction(labeled.prediction_id) == labeled
        assert log.get_prediction(unlabeled.prediction_id) == unlabeled
        assert _events(log, labeled.prediction_id) == [("b", None, None, None)]  # an old event: no source recorded

        queue = ReviewQueue(log)
        assert queue.refill("v1", "margin") == 1
        [item], _ = queue.lease("ann", 1, HOUR)
        queue.answer(item.lease_id, unlabeled.prediction_id, "a", reviewer="ann")
        assert _events(log, unlabeled.prediction_id) == [("a", None, REVIEW, "ann")]
        assert sorted(e.record_id for e in log.labeled_examples()) == sorted([labeled.prediction_id, unlabeled.prediction_id])
    finally:
        log.close()
