"""The label check before a retrain (training/retrain/label_check.py) and what the retrain data does with its flags.

Synthetic traffic where the serving model is confidently wrong on a third of the images (as under a
shift), reviewers give true labels, and a known share of them is flipped: the cross-validated probe
must find the flipped ones, where the serving model's own probabilities would also flag its
mistakes' corrections."""
from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np
import pytest

from exporters.prediction_log.records import PredictionRecord, encode_embedding
from exporters.prediction_log.sql import open_prediction_log
from tests.training_data import make_digits
from training.data.sources import LabeledFiles, discover
from training.retrain.dataset import FeedbackShares, build_retrain_data, labeled_example_role
from training.retrain.label_check import _find_issues, _out_of_sample, check_labels, logged_probabilities

CLASSES = ["a", "b", "c"]


def traffic(n: int = 240, flip: float = 0.15, champion_wrong: float = 0.35, seed: int = 0):
    """(records with labels, the ids whose label was flipped). Embeddings cluster by true class."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(3, 16))
    records, flipped = [], set()
    for i in range(n):
        true = i % 3
        emb = centers[true] + rng.normal(0, 1, 16)
        predicted = (true + 1) % 3 if rng.random() < champion_wrong else true  # confidently wrong, as on shifted traffic
        probs = np.full(3, 0.05)
        probs[predicted] = 0.9
        label = true
        if rng.random() < flip:
            label = (true + rng.integers(1, 3)) % 3
            flipped.add(f"p{i}")
        records.append(PredictionRecord(
            prediction_id=f"p{i}", created_at=1000.0 + i, model_version="v1", label=CLASSES[predicted],
            confidence=0.9, probabilities=probs.tolist(), image_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
            image_stored=True, filename=f"{i}.png", embedding=encode_embedding(emb.astype(np.float32)), embedding_space="pca",
            feedback_label=CLASSES[label], feedback_at=2000.0 + i))
    return records, flipped


def precision_recall(flagged: set[str], flipped: set[str]) -> tuple[float, float]:
    hits = len(flagged & flipped)
    return hits / max(1, len(flagged)), hits / max(1, len(flipped))


def test_the_probe_finds_flipped_labels_where_the_serving_models_probabilities_flag_its_corrections():
    records, flipped = traffic()
    result = check_labels(records, CLASSES, "exclude")
    assert result.methods == {"v1": "probe+logged"} and result.checked == len(records)
    precision, recall = precision_recall(set(result.flagged_ids), flipped)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    # The serving model's own (shifted) probabilities would flag the corrections of its mistakes: with
    # too few labels for the probe, nothing is checked rather than that.
    logged = np.array([r.probabilities for r in records])
    labels = np.array([CLASSES.index(r.feedback_label) for r in records])
    flagged = _find_issues(labels, logged)
    right_flagged = sum(1 for r, f in zip(records, flagged) if f and r.prediction_id not in flipped)
    assert right_flagged > 3 * len(set(result.flagged_ids) - flipped)
    few = check_labels(records[:30], CLASSES, "exclude")
    assert few.flagged == [] and few.checked == 0 and few.unchecked == 30
    assert few.methods["v1"].startswith("not checked: 30 labels") and "nothing checked" in few.summary()
    example = result.to_json()["examples"][0]
    assert example["suggested"] != example["label"] and example["label_probability"] < 0.5


def test_clean_labels_are_rarely_flagged_and_a_second_look_is_trusted():
    records, flipped = traffic(flip=0.0)
    assert not flipped
    result = check_labels(records, CLASSES, "exclude")
    assert len(result.flagged) <= 0.03 * len(records), result.flagged
    noisy, flipped = traffic(seed=1)
    trusted = set(sorted(flipped)[:5])
    again = check_labels(noisy, CLASSES, "keep", trusted=trusted)
    assert again.trusted == 5 and not trusted & set(again.flagged_ids) and again.checked == len(noisy) - 5


def test_classes_too_small_to_judge_are_unchecked_and_a_bad_policy_is_refused():
    records, _ = traffic(n=60, flip=0.0)
    lone = [r for r in records if r.feedback_label != "c"] + [next(r for r in records if r.feedback_label == "c")]
    result = check_labels(lone, CLASSES, "exclude")
    assert result.unchecked == 1 and result.checked == len(lone) - 1
    # every class under the minimum (a forced retrain on a handful of labels): nothing to check, no crash
    handful = [r for r in records if r.feedback_label != "c"][:8]
    none = check_labels(handful, CLASSES, "exclude")
    assert none.checked == 0 and none.unchecked == len(handful) and "nothing checked" in none.summary()
    with pytest.raises(ValueError, match="exclude"):
        check_labels(records, CLASSES, "drop")


@pytest.mark.parametrize("policy", ["exclude", "downweight", "keep"])
def test_the_retrain_data_follows_the_policy_for_flagged_images(tmp_path, policy):
    digits = make_digits(tmp_path / "digits", digits=(0, 1), per_class=20)
    files = discover(digits).train
    classes = files.classes
    log = open_prediction_log(str(tmp_path / "data"))
    try:
        shas = []
        for i, path in enumerate(files.paths[:24]):  # the labeled traffic; the rest is the original data
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            log.store_image(sha, data)
            log.add_predictions([PredictionRecord(f"id{i}", time.time(), "v1", classes[0], 0.9, [0.9, 0.1], sha, True, path.name)])
            log.record_feedback(f"id{i}", classes[int(files.labels[i])])
            shas.append(sha)
        original = {"train": LabeledFiles(files.paths[24:38], files.labels[24:38], classes),
                    "val": LabeledFiles(files.paths[38:], files.labels[38:], classes), "test": None}
        shares = FeedbackShares(holdout=0.3, val=0.2, weight=0.5)
        suspect = set(shas[:12])
        data = build_retrain_data(original, log, classes, 32, tmp_path / "cache", shares, suspect=suspect, suspect_policy=policy)
    finally:
        log.close()
    roles = [labeled_example_role(s, 0.3, 0.2) for s in shas]
    suspect_train = sum(1 for s, r in zip(shas, roles) if s in suspect and r == "train")
    counts = data.counts
    if policy == "keep":
        assert counts["suspect_labels"] == {"set_aside": 0, "trained_once": 0}
        assert sum(counts["feedback"].values()) == len(shas)
    elif policy == "exclude":
        assert counts["suspect_labels"] == {"set_aside": 12, "trained_once": 0}
        assert sum(counts["feedback"].values()) == len(shas) - 12
    else:  # downweight: suspect train images once, the rest of the suspects out (never in the holdout)
        assert counts["suspect_labels"] == {"set_aside": 12 - suspect_train, "trained_once": suspect_train}
        assert suspect_train > 0
        repeat = counts["feedback_repeat"]
        assert len(data.splits.train) == 14 + counts["feedback"]["train"] * repeat + suspect_train and repeat > 1
    held = {p.name for p in data.holdout_feedback.paths}
    assert policy == "keep" or not held & set(suspect)


def test_a_label_the_serving_model_agrees_with_is_not_flagged_on_the_probe_alone():
    """Images that look like another class in embedding space, labeled as the served model predicted:
    the probe doubts them, the model that served them does not, and the check flags only what both
    doubt. (The price: a reviewer who accepts a wrong answer of the model is not caught.)"""
    records, _ = traffic(flip=0.0)
    odd = []
    for rec in records[:12]:
        # looks like the class the served model takes for this label when it errs (predicted = true + 1)
        wanted = CLASSES[(CLASSES.index(rec.feedback_label) - 1) % 3]
        other = next(r for r in records[12:] if r.feedback_label == wanted)
        probs = [0.9 if c == rec.feedback_label else 0.05 for c in CLASSES]
        odd.append(dataclasses.replace(rec, embedding=other.embedding, probabilities=probs, label=rec.feedback_label))
    records = odd + records[12:]
    odd_ids = {r.prediction_id for r in odd}
    result = check_labels(records, CLASSES, "exclude")
    assert not odd_ids & set(result.flagged_ids)
    labels = np.array([CLASSES.index(r.feedback_label) for r in records])
    probe, _ = _out_of_sample(records, labels, logged_probabilities(records, len(CLASSES)), 0)
    probe_flags = {r.prediction_id for r, f in zip(records, _find_issues(labels, probe)) if f}
    assert len(odd_ids & probe_flags) >= 2, "the probe alone must doubt them for this test to mean anything"
