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

import numpy as np

from exporters.onnx_runtime import read_bundle_metadata
from exporters.reference_stats import load_reference, project
from training.drift import stats
from training.errors import TrainingError

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


@dataclass
class LiveWindow:
    probs: np.ndarray  # N x K
    embeddings: np.ndarray | None  # PCA-projected, M x d (records without an embedding are left out)
    feedback: np.ndarray  # N class indices, -1 where no (known) feedback label
    first_at: float | None
    last_at: float | None
    model_versions: list[str]


def load_reference_set(bundle_dir: Path) -> ReferenceSet:
    meta = read_bundle_metadata(bundle_dir)
    summary = meta.get("reference") or {}
    path = Path(bundle_dir) / summary.get("file", "reference.npz")
    if not path.is_file():
        raise TrainingError(f"bundle {meta.get('version')} has no reference statistics ({path.name}); re-export it with `cnnloop export`")
    arrays = load_reference(path)
    return ReferenceSet(
        version=meta.get("version", "?"), labels=list(meta["labels"]), probs=arrays["probs_sample"].astype(np.float64),
        labels_idx=arrays["labels_sample"], embeddings=arrays["embeddings_pca_sample"].astype(np.float64),
        pca_mean=arrays["pca_mean"], pca_components=arrays["pca_components"],
        val_accuracy=float(summary.get("val_accuracy", float("nan"))), temperature=float(summary.get("temperature", 1.0)),
    )


def window_from_records(records: list, reference: ReferenceSet) -> LiveWindow:
    """Prediction records (exporters.prediction_log) -> arrays; embeddings stored raw are projected here."""
    from exporters.prediction_log import decode_embedding

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
        "feedback": feedback_section(reference, window, min_feedback, accuracy_margin),
    }
    if n < min_samples:
        report.update(status=INSUFFICIENT, drift_detected=None, combined_p_value=None, severity=None, tests={},
                      reason=f"{n} prediction(s) in the window, fewer than the {min_samples} a verdict needs")
        return report

    k = len(reference.labels)
    ref_counts = np.bincount(reference.probs.argmax(1), minlength=k)
    live_counts = np.bincount(window.probs.argmax(1), minlength=k)
    verdict_tests = [
        stats.bbsd_ks(reference.probs, window.probs, alpha),
        stats.class_distribution_shift(ref_counts, live_counts, alpha),
    ]
    if window.embeddings is not None and len(window.embeddings) >= min(min_samples, n):
        verdict_tests.append(stats.mmd_rbf(reference.embeddings, window.embeddings, alpha, n_permutations=permutations, seed=seed))
    detected, p = stats.combine(verdict_tests, alpha)
    supporting = [stats.confidence_shift(reference.probs, window.probs, alpha), stats.entropy_shift(reference.probs, window.probs, alpha)]
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
