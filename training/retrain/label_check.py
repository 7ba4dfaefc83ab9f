"""Label checks before a retrain: confident learning (cleanlab) on out-of-sample probabilities.

People make mistakes, and one wrong label in the holdout can flip a champion/challenger decision.
cleanlab's `find_label_issues` flags labels that disagree with what a model predicts for the image
more than the class's typical confidence allows. It needs probabilities from a model that never saw
that label. A label is flagged when cleanlab flags it on both of two sources of probabilities:
cross-validated probabilities of a logistic regression on the logged embeddings and logged
log-probabilities of one model version's labeled predictions (each label scored by a probe fitted
on the other folds, so it learns the traffic as it is now, shift included), and the serving
model's own logged probabilities.

The serving model's probabilities alone are out of sample too (it predicted before the label
existed), but under drift it is wrong on much of the new traffic, and the queue hands people
exactly the images it is least sure of: its disagreement flags the corrections people make. The
probe alone doubts hard images the model got right. Both together, on the demo's 108 queue
labels with 10% / 20% flipped: precision 0.50 / 0.73, recall 0.50 / 0.79, 5 right labels
flagged, against 8-14 (probe) and 17-19 (logged) (bench/label_check_methods.py, median of 5
seeds; bench/results/label_check_methods.json). The price: a reviewer who accepts a wrong answer
of the model is not caught. A version with too few labels for the probe would leave only the logged
probabilities, which flag the champion's corrected mistakes: it is not checked, and the report
says so.

A label a reviewer gave on a second look (the check sent it back and a person answered) is trusted
and not checked again. Labeled uploads carry no logged probabilities and are not checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exporters.prediction_log.records import PredictionRecord, decode_embedding

POLICIES = ("exclude", "keep", "downweight")
# Below this many labels of one model version, or this many per class, a 5-fold probe is too thin.
MIN_PROBE_LABELS = 40
MIN_PROBE_PER_CLASS = 5
FOLDS = 5
PROBE_C = 0.1
FILTER_BY = "prune_by_noise_rate"
SHOWN = 20  # flagged labels the report details (all are listed by id)


@dataclass
class LabelCheck:
    policy: str
    checked: int = 0
    trusted: int = 0  # confirmed on a second look: not checked again
    unchecked: int = 0  # too few labels to judge (of the version, or of the class)
    methods: dict = field(default_factory=dict)  # model_version -> "probe+logged", or why it was not checked
    flagged: list[dict] = field(default_factory=list)  # {prediction_id, image_sha256, label, suggested, label_probability}

    @property
    def flagged_ids(self) -> list[str]:
        return [f["prediction_id"] for f in self.flagged]

    @property
    def flagged_images(self) -> set[str]:
        return {f["image_sha256"] for f in self.flagged}

    def to_json(self) -> dict:
        return {"policy": self.policy, "checked": self.checked, "trusted": self.trusted, "unchecked": self.unchecked,
                "methods": self.methods, "flagged": self.flagged_ids,
                "examples": sorted(self.flagged, key=lambda f: f["label_probability"])[:SHOWN]}

    def summary(self) -> str:
        if not self.checked:
            why = "; ".join(sorted(set(self.methods.values()))) or "no labeled predictions"
            return f"label check: nothing checked ({why})"
        how = ", ".join(sorted(set(self.methods.values())))
        action = {"exclude": "left out of training and the holdout", "keep": "kept",
                  "downweight": "trained on once (not repeated), kept out of the holdout"}[self.policy]
        return (f"label check ({how}): {len(self.flagged)} of {self.checked} label(s) look wrong; {action}, "
                f"and sent back to the review queue for a second look")


def check_labels(records: list[PredictionRecord], classes: list[str], policy: str, trusted: set[str] = frozenset(),
                 seed: int = 0) -> LabelCheck:
    """Flag likely label errors among labeled predictions (`feedback_label` set)."""
    if policy not in POLICIES:
        raise ValueError(f"label_check policy must be one of {POLICIES}, got {policy!r}")
    result = LabelCheck(policy)
    index = {c: i for i, c in enumerate(classes)}
    # The newest label per image counts; one image predicted twice is one example.
    newest: dict[str, PredictionRecord] = {}
    for rec in records:
        if rec.feedback_label in index and len(rec.probabilities) == len(classes):
            kept = newest.get(rec.image_sha256)
            if kept is None or (rec.feedback_at or 0) >= (kept.feedback_at or 0):
                newest[rec.image_sha256] = rec
    by_version: dict[str, list[PredictionRecord]] = {}
    for rec in newest.values():
        if rec.prediction_id in trusted:
            result.trusted += 1
        else:
            by_version.setdefault(rec.model_version, []).append(rec)
    for version, group in sorted(by_version.items()):
        labels = np.array([index[r.feedback_label] for r in group])
        # A class with a handful of labels cannot be cross-validated: those labels go unchecked.
        judged = judged_mask(labels, len(classes))
        result.unchecked += int((~judged).sum())
        group, labels = [r for r, j in zip(group, judged) if j], labels[judged]
        logged = logged_probabilities(group, len(classes))
        probs, method = _out_of_sample(group, labels, logged, seed)
        result.methods[version] = method
        if probs is None:
            result.unchecked += len(group)
            continue
        # Only what the serving model's logged probabilities flag too: a label the probe doubts but
        # the model that served the image agrees with is not worth a person's second look.
        issues = _find_issues(labels, probs) & _find_issues(labels, logged)
        result.checked += len(group)
        for i in np.flatnonzero(issues):
            rec = group[i]
            result.flagged.append({"prediction_id": rec.prediction_id, "image_sha256": rec.image_sha256,
                                   "label": rec.feedback_label, "suggested": classes[int(probs[i].argmax())],
                                   "label_probability": round(float(probs[i, labels[i]]), 4)})
    return result


def judged_mask(labels: np.ndarray, k: int) -> np.ndarray:
    """Labels of classes with enough labels to cross-validate a probe on."""
    return np.bincount(labels, minlength=k)[labels] >= MIN_PROBE_PER_CLASS


def logged_probabilities(group: list[PredictionRecord], k: int) -> np.ndarray:
    logged = np.clip(np.array([r.probabilities for r in group], dtype=np.float64).reshape(len(group), k), 1e-6, None)
    return logged / logged.sum(1, keepdims=True)


def _out_of_sample(group: list[PredictionRecord], labels: np.ndarray, logged: np.ndarray,
                   seed: int) -> tuple[np.ndarray | None, str]:
    """(out-of-fold probabilities of the probe, "probe+logged"), or (None, why not). `labels` are of
    classes with MIN_PROBE_PER_CLASS labels or more (judged_mask); `logged` is the group's logged probabilities."""
    k = logged.shape[1]
    if len(group) < MIN_PROBE_LABELS:
        return None, f"not checked: {len(group)} labels in classes with {MIN_PROBE_PER_CLASS} or more, the probe needs {MIN_PROBE_LABELS}"
    counts = np.bincount(labels, minlength=k)
    present = counts[counts > 0]
    embeddings = [decode_embedding(r.embedding) for r in group]
    if len(present) < 2:
        return None, f"not checked: fewer than 2 classes have {MIN_PROBE_PER_CLASS} labels or more"
    if any(e is None for e in embeddings) or len({e.shape for e in embeddings}) != 1:
        return None, "not checked: the predictions were logged without embeddings"
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.hstack([np.stack(embeddings).astype(np.float64), np.log(logged)])
    folds = StratifiedKFold(n_splits=min(FOLDS, int(present.min())), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=3000))
    cols = np.flatnonzero(counts > 0)  # the probe only knows classes it saw labeled
    local = np.searchsorted(cols, labels)
    out = np.zeros((len(group), k))
    out[:, cols] = cross_val_predict(probe, features, local, cv=folds, method="predict_proba")
    return out, "probe+logged"


def _find_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's flags, on the columns of the classes that have labels (renormalised)."""
    from cleanlab.filter import find_label_issues

    cols = np.flatnonzero(np.bincount(labels, minlength=probs.shape[1]))
    sub = np.clip(probs[:, cols], 1e-9, None)
    sub /= sub.sum(1, keepdims=True)
    return find_label_issues(np.searchsorted(cols, labels), sub, filter_by=FILTER_BY)
