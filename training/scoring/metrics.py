"""Classification scores from predicted probabilities: pure numpy/sklearn, no torch."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_scores(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """accuracy, macro precision/recall/F1, NLL, per-class report and confusion matrix (rows = truth)."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=int)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    nll = float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1)).mean()) if len(y_true) else float("nan")
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "macro_precision": float(p.mean()),
        "macro_recall": float(r.mean()),
        "macro_f1": float(f.mean()),
        "loss": nll,
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }
