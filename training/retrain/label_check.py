"""Label checks before a retrain: confident learning (cleanlab) on out-of-sample probabilities.

People make mistakes, and one wrong label in the holdout can flip a champion/challenger decision.
cleanlab's `find_label_issues` flags labels that disagree with what a model predicts for the image
more than the class's typical confidence allows. It needs probabilities from a model that never saw
that label. Two sources, both out of sample:

- `probe` (the default when there are enough labels): cross-validated probabilities of a logistic
  regression on the logged embeddings and logged log-probabilities of the labeled predictions of one
  model version. Each label is scored by a probe fitted on the other folds, so it learns the
  traffic as it is now, shift included.
- `logged`: the serving model's logged probabilities (it predicted before the label existed).
  Under drift that model is wrong on much of the new traffic, and the queue hands people exactly
  the images it is least sure of, so its disagreement flags correct corrections; it is the
  fallback for versions with too few labels to cross-validate.

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
SHOWN = 20  # flagged labels the report details (all are listed by id)


@dataclass
class LabelCheck:
    policy: str
    checked: int = 0
    trusted: int = 0  # confirmed on a second look: not checked again
    unchecked: int = 0  # classes with too few labels to judge
    methods: dict = field(default_factory=dict)  # model_version -> "probe" | "logged"
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
            return "label check: no labels to check"
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
        probs, method = _out_of_sample(group, labels, len(classes), seed)
        result.methods[version] = method
        issues, checked = _find_issues(labels, probs)
        result.checked += int(checked.sum())
        result.unchecked += int((~checked).sum())
        for i in np.flatnonzero(issues):
            rec = group[i]
            result.flagged.append({"prediction_id": rec.prediction_id, "image_sha256": rec.image_sha256,
                                   "label": rec.feedback_label, "suggested": classes[int(probs[i].argmax())],
                                   "label_probability": round(float(probs[i, labels[i]]), 4)})
    return result


def _out_of_sample(group: list[PredictionRecord], labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, str]:
    logged = np.array([r.probabilities for r in group], dtype=np.float64)
    logged = np.clip(logged, 1e-6, None)
    logged /= logged.sum(1, keepdims=True)
    counts = np.bincount(labels, minlength=k)
    present = counts[counts > 0]
    embeddings = [decode_embedding(r.embedding) for r in group]
    if (len(group) < MIN_PROBE_LABELS or len(present) < 2 or present.min() < MIN_PROBE_PER_CLASS
            or any(e is None for e in embeddings) or len({e.shape for e in embeddings}) != 1):
        return logged, "logged"
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.hstack([np.stack(embeddings).astype(np.float64), np.log(logged)])
    folds = StratifiedKFold(n_splits=min(FOLDS, int(present.min())), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cols = np.flatnonzero(counts > 0)  # the probe only knows classes it saw labeled
    local = np.searchsorted(cols, labels)
    out = np.zeros((len(group), k))
    out[:, cols] = cross_val_predict(probe, features, local, cv=folds, method="predict_proba")
    return out, "probe"


def _find_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, checked) masks. Classes with fewer than 2 labels cannot be judged: unchecked."""
    from cleanlab.filter import find_label_issues

    counts = np.bincount(labels, minlength=probs.shape[1])
    checked = counts[labels] >= 2
    cols = np.flatnonzero(counts >= 2)
    flagged = np.zeros(len(labels), dtype=bool)
    if len(cols) < 2 or checked.sum() < 4:
        return flagged, np.zeros(len(labels), dtype=bool)
    sub = probs[checked][:, cols]
    sub = np.clip(sub, 1e-9, None)
    sub /= sub.sum(1, keepdims=True)
    local = np.searchsorted(cols, labels[checked])
    flagged[np.flatnonzero(checked)] = find_label_issues(local, sub, filter_by="prune_by_noise_rate")
    return flagged, checked
