"""The drift report over the prediction log: windows, verdicts, feedback accuracy, rendering."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from exporters.prediction_log.records import PredictionRecord, encode_embedding, new_record_id
from tests.log_backends import backend, sql_log  # noqa: F401  (fixtures: the log on SQLite and PostgreSQL)
from training.drift.render import plot_report, print_report
from training.drift.report import INSUFFICIENT, LiveWindow, ReferenceSet, build_report, window_from_records

K, D = 3, 8


def population(n: int, seed: int, shift: float = 0.0, prior=(1 / 3, 1 / 3, 1 / 3)):
    """Class-conditional Gaussian embeddings; softmax of a fixed linear map: what a real model emits."""
    rng = np.random.default_rng(seed)
    y = rng.choice(K, size=n, p=prior)
    centres = np.eye(K, D) * 3.0
    emb = centres[y] + rng.normal(size=(n, D)) + shift
    logits = emb @ np.eye(D, K) * 1.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), emb, y


def reference(n: int = 300) -> ReferenceSet:
    p, e, y = population(n, seed=0)
    return ReferenceSet("v1", ["a", "b", "c"], p, y, e, np.zeros(D, np.float32), np.eye(D, dtype=np.float32), 0.9, 1.0)


def window(n: int, seed: int, shift: float = 0.0, feedback_correct: float | None = None, prior=(1 / 3, 1 / 3, 1 / 3)) -> LiveWindow:
    p, e, y = population(n, seed, shift, prior)
    fb = np.full(n, -1)
    if feedback_correct is not None:
        pred = p.argmax(1)
        rng = np.random.default_rng(seed + 99)
        fb = np.where(rng.random(n) < feedback_correct, pred, (pred + 1) % K)
    return LiveWindow(p, e, fb, 0.0, 1.0, ["v1"])


def test_below_min_samples_the_report_says_insufficient_data_not_a_verdict():
    r = build_report(reference(), window(40, 1), min_samples=100)
    assert r["status"] == INSUFFICIENT and r["drift_detected"] is None and "40 prediction" in r["reason"]


def test_same_distribution_is_no_drift():
    r = build_report(reference(), window(200, 1), permutations=200)
    assert r["status"] == "no_drift" and r["severity"] == 0.0
    assert set(r["verdict_tests"]) == {"bbsd_ks", "class_chi2", "mmd"}


def test_shifted_embeddings_are_drift_with_a_positive_severity():
    r = build_report(reference(), window(200, 1, shift=1.5), permutations=200)
    assert r["drift_detected"] and r["severity"] > 1.3 and r["tests"]["mmd"]["detected"]


def test_label_shift_is_seen_by_the_class_distribution_test():
    r = build_report(reference(), window(200, 1, prior=(0.8, 0.1, 0.1)), permutations=200)
    assert r["drift_detected"] and r["tests"]["class_chi2"]["detected"]


def test_feedback_accuracy_below_validation_is_flagged_with_its_interval():
    r = build_report(reference(), window(200, 1, feedback_correct=0.6), min_feedback=30, accuracy_margin=0.05, permutations=100)
    fb = r["feedback"]
    assert fb["n"] == 200 and fb["below_validation"] and fb["ci95"][0] < fb["accuracy"] < fb["ci95"][1] < 0.9


def test_report_is_json_and_renders_as_table_and_png(tmp_path):
    from rich.console import Console

    ref, live = reference(), window(150, 2, shift=1.0)
    r = build_report(ref, live, permutations=100)
    json.dumps(r)
    console = Console(record=True, width=120)
    print_report(r, console)
    assert "DRIFT" in console.export_text()
    png = plot_report(r, ref, live, tmp_path / "drift.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _records(n: int, version: str, t0: float, probs=(0.8, 0.1, 0.1)) -> list[PredictionRecord]:
    out = []
    for i in range(n):
        at = t0 + i
        out.append(PredictionRecord(new_record_id(at), at, version, "a", probs[0], list(probs), f"{i:064x}", True, f"{i}.png",
                                    encode_embedding(np.arange(D, dtype=np.float32)), "pca"))
    return out


@pytest.fixture
def log(sql_log):
    return sql_log  # SQLite and PostgreSQL (tests/log_backends.py)


def test_window_is_the_newest_predictions_of_one_model_oldest_first(log):
    t0 = time.time() - 1000
    log.add_predictions(_records(5, "v1", t0) + _records(3, "v2", t0 + 100) + _records(4, "v1", t0 + 200))
    got = log.predictions(last=6, model_version="v1")
    assert [r.model_version for r in got] == ["v1"] * 6
    assert [r.created_at for r in got] == sorted(r.created_at for r in got)
    assert got[-1].created_at == pytest.approx(t0 + 203)
    assert len(log.predictions(since=t0 + 150)) == 4


def test_window_carries_the_latest_feedback_label(log):
    records = _records(3, "v1", time.time() - 10)
    log.add_predictions(records)
    log.record_feedback(records[1].prediction_id, "b")
    log.record_feedback(records[1].prediction_id, "c")
    ref = reference()
    live = window_from_records(log.predictions(model_version="v1"), ref)
    assert live.feedback.tolist() == [-1, 2, -1]
    assert live.probs.shape == (3, K) and live.embeddings.shape == (3, D)


def test_window_audits_label_changes_the_same_on_both_logs(log):
    records = _records(4, "v1", time.time() - 10)
    outside = _records(1, "v2", time.time() - 5)
    log.add_predictions(records + outside)
    log.record_feedback(records[0].prediction_id, "a")
    log.record_feedback(records[1].prediction_id, "b")
    log.record_feedback(records[1].prediction_id, "b")  # a repeat changes nothing
    log.record_feedback(records[1].prediction_id, "c")
    log.record_feedback(records[1].prediction_id, "a")
    log.record_feedback(outside[0].prediction_id, "b")
    window_records = log.predictions(model_version="v1")
    live = window_from_records(window_records, reference(), log.label_changes(r.prediction_id for r in window_records))
    changes = build_report(reference(), live, min_samples=100)["label_changes"]
    assert changes == {"count": 4, "relabelled_predictions": 1}


def test_the_rendered_report_has_a_line_for_label_changes():
    from rich.console import Console

    from exporters.prediction_log.records import LabelChanges

    live = window(40, 1)
    live.label_changes = LabelChanges(count=7, relabelled_predictions=2)
    console = Console(record=True, width=120)
    print_report(build_report(reference(), live, min_samples=100), console)
    assert "label changes: 7 feedback event(s), 2 prediction(s) relabelled" in console.export_text()


def test_a_window_read_without_the_log_reports_no_label_changes():
    assert build_report(reference(), window(40, 1), min_samples=100)["label_changes"] is None


def test_feedback_on_unstored_images_is_counted_in_the_report_and_its_rendering(log):
    from rich.console import Console

    records = _records(3, "v1", time.time() - 10)
    records[0].image_stored = records[1].image_stored = False
    log.add_predictions(records)
    for r in records:
        log.record_feedback(r.prediction_id, "b")
    live = window_from_records(log.predictions(model_version="v1"), reference())
    report = build_report(reference(), live, min_samples=100)
    assert report["feedback"]["without_image"] == 2 and report["feedback"]["n"] == 3
    console = Console(record=True, width=200)
    print_report(report, console)
    assert "2 feedback label(s) are on predictions whose image was not stored" in console.export_text()
