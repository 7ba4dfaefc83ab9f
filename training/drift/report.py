"""The drift report: a window of logged predictions vs the production bundle's reference statistics.

Pure (arrays in, a JSON-able dict out); reading the log and the bundle is `load_reference_set` and
`window_from_records`, rendering is `render.py`. Verdict = Bonferroni over three detectors that
each see a different face of a shift: black-box shift detection on softmax outputs (Rabanser et al.
2019), predicted-class distribution, and embedding MMD. Confidence/entropy shift, feedback accuracy
and label-free accuracy estimates are reported beside the verdict, not folded into it: they explain
a shift, and folding five correlated tests in would only cost power.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exporters.model_store.bundle import read_bundle, read_reference_stats
from exporters.calibration import apply_temperature
from exporters.reference_stats import project
from training.drift import stats
from training.errors import TrainingError

if TYPE_CHECKING:
    from exporters.prediction_log.records import LabelChanges

INSUFFICIENT = "insufficient_data"


@dataclass
class ReferenceSet:
    version: str
    labels: list[str]
    probs: np.ndarray  # validation softmax sample, N x K
    labels_idx: np.ndarray  # their true classes
    embeddings: np.ndarray  # PCA-projected validation embeddings, N x d
    pca_mean: np.ndarray
    pca_components: np.ndarray
    val_accuracy: float
    temperature: float
    served_temperature: float = 1.0  # the bundle's calibration: probabilities in the log and sample are divided by it


@dataclass
class LiveWindow:
    probs: np.ndarray  # N x K
    embeddings: np.ndarray | None  # PCA-projected, M x d (records without an embedding are left out)
    feedback: np.ndarray  # N class indices, -1 where no (known) feedback label
    first_at: float | None
    last_at: float | None
    model_versions: list[str]
    label_changes: LabelChanges | None = None  # the feedback events on these predictions; None: not read
    # Labeled predictions whose image was not stored (store_sample_rate < 1): they count for accuracy, never for a retrain.
    feedback_without_image: int = 0


def load_reference_set(bundle_dir: Path) -> ReferenceSet:
    bundle = read_bundle(bundle_dir)
    ref = read_reference_stats(bundle)
    if not ref.has_arrays:
        raise TrainingError(f"bundle {bundle.version} has no reference statistics ({ref.path.name}); re-export it with `cnnloop export`")
    return ReferenceSet(
        # At the precision the log keeps (6 decimals, service/predictions.py): a sharpened class probability
        # of 1e-9 is 0.0 in the log, and the per-class KS would call that difference drift.
        version=bundle.version or "?", labels=list(bundle.labels), probs=np.round(ref.probs_sample.astype(np.float64), 6),
        labels_idx=ref.labels_sample, embeddings=ref.embeddings_pca_sample.astype(np.float64),
        pca_mean=ref.pca_mean, pca_components=ref.pca_components,
        val_accuracy=ref.val_accuracy, temperature=ref.temperature,
        served_temperature=float((bundle.calibration or {}).get("temperature", 1.0)),
    )


def window_from_records(records: list, reference: ReferenceSet, label_changes: LabelChanges | None = None) -> LiveWindow:
    """Prediction records (exporters.prediction_log.records) -> arrays; embeddings stored raw are projected here.

    `label_changes` is the log's `label_changes` of the same records, carried into the report as an audit."""
    from exporters.prediction_log.records import decode_embedding

    k = len(reference.labels)
    index = {name: i for i, name in enumerate(reference.labels)}
    probs, embs, feedback = [], [], []
    d = reference.pca_components.shape[0]
    for r in records:
        if len(r.probabilities) != k:
            continue  # a model with another label set: not comparable with this reference
        probs.append(r.probabilities)
        feedback.append(index.get(r.feedback_label, -1) if r.feedback_label else -1)
        e = decode_embedding(r.embedding)
        if e is None:
            continue
        if r.embedding_space == "raw" and len(e) == reference.pca_components.shape[1]:
            e = project(e[None], reference.pca_mean, reference.pca_components)[0]
        if len(e) == d:
            embs.append(e)
    return LiveWindow(
        probs=np.asarray(probs, dtype=np.float64).reshape(-1, k),
        embeddings=np.asarray(embs, dtype=np.float64) if embs else None,
        feedback=np.asarray(feedback, dtype=np.int64),
        first_at=min((r.created_at for r in records), default=None), last_at=max((r.created_at for r in records), default=None),
        model_versions=sorted({r.model_version for r in records}),
        label_changes=label_changes,
        feedback_without_image=sum(1 for r in records if r.feedback_label and not r.image_stored),
    )


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def feedback_section(reference: ReferenceSet, window: LiveWindow, min_feedback: int, margin: float) -> dict:
    labeled = window.feedback >= 0
    n = int(labeled.sum())
    correct = int((window.probs[labeled].argmax(1) == window.feedback[labeled]).sum()) if n else 0
    lo, hi = stats.wilson_interval(correct, n)
    enough = n >= min_feedback
    acc = correct / n if n else None
    return {
        "n": n, "correct": correct, "accuracy": acc, "ci95": [_finite(lo), _finite(hi)],
        "validation_accuracy": _finite(reference.val_accuracy), "margin": margin, "enough": enough,
        # A verdict only with enough labels; below validation by the margin on the point estimate,
        # with the interval shown so a reader can judge how sure that is.
        "below_validation": bool(enough and acc is not None and acc < reference.val_accuracy - margin),
        "significantly_below": bool(enough and hi == hi and hi < reference.val_accuracy),
    }


def build_report(reference: ReferenceSet, window: LiveWindow, *, alpha: float = 0.05, min_samples: int = 100,
                 min_feedback: int = 30, accuracy_margin: float = 0.05, permutations: int = 500, seed: int = 0) -> dict:
    """The whole report as a JSON-able dict; `status` is 'drift', 'no_drift' or 'insufficient_data'."""
    n = len(window.probs)
    report = {
        "model_version": reference.version, "labels": reference.labels,
        "window": {"n": n, "first_at": window.first_at, "last_at": window.last_at,
                   "n_embeddings": 0 if window.embeddings is None else len(window.embeddings),
                   "model_versions": window.model_versions},
        "reference": {"n": len(reference.probs), "val_accuracy": _finite(reference.val_accuracy),
                      "temperature": reference.temperature},
        "alpha": alpha, "min_samples": min_samples,
        "feedback": {**feedback_section(reference, window, min_feedback, accuracy_margin),
                     "without_image": window.feedback_without_image},
        # An audit beside the verdict: labels changed often mean unsure labellers, and so noisy retraining data.
        "label_changes": window.label_changes.as_dict() if window.label_changes is not None else None,
    }
    if n < min_samples:
        report.update(status=INSUFFICIENT, drift_detected=None, combined_p_value=None, severity=None, tests={},
                      reason=f"{n} prediction(s) in the window, fewer than the {min_samples} a verdict needs")
        return report

    k = len(reference.labels)
    # The shift tests read the model's own outputs: the served (calibrated) probabilities are mapped
    # back by the bundle's temperature. A sharpening temperature fitted on a val split the model gets
    # all right magnifies tiny confidence differences, and made the demo's clean traffic "drift".
    ref_raw, live_raw = (apply_temperature(p, 1.0 / reference.served_temperature) for p in (reference.probs, window.probs))
    ref_counts = np.bincount(reference.probs.argmax(1), minlength=k)
    live_counts = np.bincount(window.probs.argmax(1), minlength=k)
    verdict_tests = [
        stats.bbsd_ks(ref_raw, live_raw, alpha),
        stats.class_distribution_shift(ref_counts, live_counts, alpha),
    ]
    if window.embeddings is not None and len(window.embeddings) >= min(min_samples, n):
        verdict_tests.append(stats.mmd_rbf(reference.embeddings, window.embeddings, alpha, n_permutations=permutations, seed=seed))
    detected, p = stats.combine(verdict_tests, alpha)
    supporting = [stats.confidence_shift(ref_raw, live_raw, alpha), stats.entropy_shift(ref_raw, live_raw, alpha)]
    report.update(
        status="drift" if detected else "no_drift", drift_detected=bool(detected), combined_p_value=float(p),
        severity=float(stats.severity(p)) if detected else 0.0,
        verdict_tests=[t.name for t in verdict_tests],
        tests={t.name: t.to_json() for t in verdict_tests + supporting},
        class_distribution={"reference": (ref_counts / max(1, ref_counts.sum())).tolist(),
                            "live": (live_counts / max(1, live_counts.sum())).tolist()},
        estimated_accuracy=stats.estimated_accuracy(reference.probs, reference.labels_idx, window.probs, reference.temperature),
    )
    return report
