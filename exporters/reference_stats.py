"""The reference a drift report compares live traffic against, computed at export time. Pure numpy.

Small figures (class prior, accuracy, ECE and the temperature left to fit on the probabilities as
served: about 1 once the bundle is calibrated) go into bundle metadata; arrays (a sample
of validation softmax outputs, the PCA basis and the projected embedding sample) go into
`reference.npz` (exporters.model_store.bundle names it and reads it back), so the service loads them without torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.calibration import (ECE_BINS, TEMPERATURE_RANGE, apply_temperature, expected_calibration_error,
                                   fit_temperature)

MAX_SAMPLE = 500
MAX_PCA_COMPONENTS = 32
# With fewer training embeddings than this, validation embeddings join the PCA fit: a basis fitted
# on 20 points has at most 19 directions and follows their noise.
MIN_PCA_FIT = 2 * MAX_PCA_COMPONENTS


def class_prior(counts: list[int] | np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1.0 / max(1, len(counts)))


def fit_pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean D, components k x D, explained variance ratio k) by SVD of the centred data."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(k, vt.shape[0]))
    var = s**2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return mean.astype(np.float32), vt[:k].astype(np.float32), ratio.astype(np.float32)


def project(embeddings: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Embeddings (N x D) on a PCA basis (N x k, float32): the one projection export, the service and the drift report use.
    The service calls it on every batch it logs: float32 embeddings are neither copied nor cast on the way."""
    return ((np.asarray(embeddings, dtype=np.float32) - mean) @ components.T).astype(np.float32, copy=False)


def reference_statistics(val_probs: np.ndarray, val_embeddings: np.ndarray, val_labels: np.ndarray,
                         train_class_counts: list[int], extra_embeddings: np.ndarray | None = None,
                         sample_size: int = MAX_SAMPLE, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(small stats for metadata, arrays for reference.npz) from validation outputs of the exported graph."""
    n = len(val_labels)
    # Fit the basis on embeddings disjoint from the projected sample (see export_bundle); only when
    # too few of those exist do validation embeddings join in.
    fit_on = val_embeddings
    if extra_embeddings is not None and len(extra_embeddings):
        fit_on = extra_embeddings if len(extra_embeddings) >= MIN_PCA_FIT else np.concatenate([val_embeddings, extra_embeddings])
    k = min(MAX_PCA_COMPONENTS, len(fit_on) - 1, val_embeddings.shape[1])
    mean, components, ratio = fit_pca(fit_on, k)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, sample_size), replace=False))
    temperature = fit_temperature(val_probs, val_labels)
    prior = class_prior(train_class_counts)
    summary = {
        "n_val": int(n),
        "sample_size": int(len(idx)),
        "class_prior": [float(p) for p in prior],
        "val_accuracy": float(np.mean(val_probs.argmax(1) == val_labels)) if n else float("nan"),
        "ece": expected_calibration_error(val_probs, val_labels),
        "ece_bins": ECE_BINS,
        "temperature": temperature,
        # At a bound, NLL kept falling: typical of a perfectly separated (often tiny) validation set.
        "temperature_at_bound": bool(temperature <= TEMPERATURE_RANGE[0] * 1.001 or temperature >= TEMPERATURE_RANGE[1] * 0.999),
        "ece_after_temperature": expected_calibration_error(apply_temperature(val_probs, temperature), val_labels),
        "pca": {"components": int(len(components)), "fitted_on": int(len(fit_on)),
                "explained_variance": float(ratio.sum())},
    }
    arrays = {
        "class_prior": prior.astype(np.float32),
        "probs_sample": val_probs[idx].astype(np.float32),
        "labels_sample": val_labels[idx].astype(np.int64),
        "pca_mean": mean,
        "pca_components": components,
        "pca_explained_variance_ratio": ratio,
        "embeddings_pca_sample": project(val_embeddings[idx], mean, components),
    }
    return summary, arrays


def save_reference(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    # Plain arrays only, so readers can (and do) load with allow_pickle=False.
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def load_reference(path: Path) -> dict[str, np.ndarray]:
    with np.load(Path(path), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# Bins with no mass would make PSI infinite; this floor is the usual convention (0.01% of mass).
PSI_EPSILON = 1e-4


def psi(expected: np.ndarray, observed: np.ndarray, eps: float = PSI_EPSILON) -> float:
    """Population stability index of two distributions over the same bins (counts or fractions)."""
    e = np.asarray(expected, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    if e.shape != o.shape or e.sum() <= 0 or o.sum() <= 0:
        return 0.0
    e = np.clip(e / e.sum(), eps, None)
    o = np.clip(o / o.sum(), eps, None)
    e, o = e / e.sum(), o / o.sum()
    return float(np.sum((o - e) * np.log(o / e)))
