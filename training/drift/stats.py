"""Two-sample drift tests between a reference (validation outputs at export) and a live window.

Pure numpy + scipy: the drift report, the retrain policy and the service all call these with arrays.
Every p-value returned is already corrected for the comparisons the test makes internally.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from exporters.calibration import apply_temperature
from exporters.reference_stats import psi

_EPS = 1e-12
# p-values below this are numerically meaningless (float64 tails), so severity saturates there.
MIN_P = 1e-16


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # pytest would otherwise try to collect it from test modules that import it

    name: str
    statistic: float
    p_value: float
    detected: bool
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _result(name: str, statistic: float, p_value: float, alpha: float, detail: dict) -> TestResult:
    p = float(min(1.0, max(0.0, p_value)))
    return TestResult(name, float(statistic), p, bool(p < alpha), detail)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _check_pair(ref: np.ndarray, live: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    ref, live = np.asarray(ref, dtype=np.float64), np.asarray(live, dtype=np.float64)
    for side, a in (("reference", ref), ("live", live)):
        if a.ndim != 2:
            raise ValueError(f"{side} {what} must be a 2-D array (samples x columns), got shape {a.shape}")
        if len(a) < 2:
            raise ValueError(f"{side} {what} need at least 2 samples, got {len(a)}")
        if not np.isfinite(a).all():
            raise ValueError(f"{side} {what} contain NaN or infinite values")
    if ref.shape[1] != live.shape[1]:
        raise ValueError(f"reference and live {what} disagree on the number of columns: "
                         f"{ref.shape[1]} vs {live.shape[1]} (same model and class list on both sides?)")
    return ref, live


def _ks(ref: np.ndarray, live: np.ndarray) -> tuple[float, float]:
    res = stats.ks_2samp(ref, live)
    return float(res.statistic), float(res.pvalue)


def bbsd_ks(ref_probs: np.ndarray, live_probs: np.ndarray, alpha: float = 0.05) -> TestResult:
    """Black-box shift detection (Rabanser et al. 2019): KS per softmax column, Bonferroni over classes.

    With 2 classes both columns carry the same information, so the correction is twice as strict as
    needed; kept uniform so that p-values mean the same thing for every K."""
    _check_alpha(alpha)
    ref, live = _check_pair(ref_probs, live_probs, "probabilities")
    per_class = []
    for k in range(ref.shape[1]):
        d, p = _ks(ref[:, k], live[:, k])
        per_class.append({"class_index": k, "statistic": d, "p_value": p})
    worst = min(per_class, key=lambda c: c["p_value"])
    p = min(1.0, ref.shape[1] * worst["p_value"])
    return _result("bbsd_ks", worst["statistic"], p, alpha, {"per_class": per_class})


def class_distribution_shift(ref_counts, live_counts, alpha: float = 0.05) -> TestResult:
    """Chi-square test of homogeneity on the 2 x K table of predicted-class counts."""
    _check_alpha(alpha)
    ref, live = np.asarray(ref_counts, dtype=np.float64), np.asarray(live_counts, dtype=np.float64)
    if ref.ndim != 1 or live.ndim != 1:
        raise ValueError(f"class counts must be 1-D (one count per class), got shapes {ref.shape} and {live.shape}")
    if ref.shape != live.shape:
        raise ValueError(f"reference and live class counts disagree on the number of classes: {len(ref)} vs {len(live)}")
    if (ref < 0).any() or (live < 0).any() or not (np.isfinite(ref).all() and np.isfinite(live).all()):
        raise ValueError("class counts must be finite and non-negative")
    for side, c in (("reference", ref), ("live", live)):
        if c.sum() < 2:
            raise ValueError(f"{side} class counts need at least 2 samples, got {c.sum():g}")
    detail = {"psi": psi(ref, live), "ref_fractions": (ref / ref.sum()).tolist(),
              "live_fractions": (live / live.sum()).tolist()}
    keep = (ref + live) > 0
    if keep.sum() < 2:
        # Both sides predict a single class: nothing to compare, and chi2 would divide by zero.
        return _result("class_chi2", 0.0, 1.0, alpha, {**detail, "dof": 0})
    # No Yates correction: it applies only to 2 x 2 tables and would make binary models less sensitive
    # than multi-class ones for the same shift.
    chi2, p, dof, _ = stats.chi2_contingency(np.stack([ref[keep], live[keep]]), correction=False)
    return _result("class_chi2", chi2, p, alpha, {**detail, "dof": int(dof)})


def _squared_distances(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def mmd_rbf(ref_emb: np.ndarray, live_emb: np.ndarray, alpha: float = 0.05, n_permutations: int = 500,
            seed: int = 0, max_points: int = 500) -> TestResult:
    """Unbiased MMD^2 with an RBF kernel (median-heuristic bandwidth) and a permutation p-value."""
    _check_alpha(alpha)
    if n_permutations < 1 or max_points < 2:
        raise ValueError(f"need n_permutations >= 1 and max_points >= 2, got {n_permutations} and {max_points}")
    ref, live = _check_pair(ref_emb, live_emb, "embeddings")
    rng = np.random.default_rng(seed)
    if len(ref) > max_points:
        ref = ref[rng.choice(len(ref), max_points, replace=False)]
    if len(live) > max_points:
        live = live[rng.choice(len(live), max_points, replace=False)]
    n, m = len(ref), len(live)
    d2 = _squared_distances(np.concatenate([ref, live]))
    off_diagonal = d2[np.triu_indices(n + m, k=1)]
    bandwidth = float(np.sqrt(np.median(off_diagonal)))
    if bandwidth <= 0:  # more than half the pairs coincide: any positive scale keeps the kernel defined
        bandwidth = 1.0
    kernel = np.exp(-d2 / (2.0 * bandwidth**2))

    # Column r of `member` marks which pooled points play "reference" in labelling r (0 = observed).
    # With diag(K) = 1 every MMD^2 is a function of x'Kx and x'K1, so one matmul scores all labellings.
    labels = np.zeros((n + m, n_permutations + 1))
    labels[:n, 0] = 1.0
    order = np.argsort(rng.random((n_permutations, n + m)), axis=1)[:, :n]
    labels[order.T, np.arange(1, n_permutations + 1)[None, :]] = 1.0
    row_sums = kernel.sum(1)
    xx = np.einsum("ir,ir->r", labels, kernel @ labels)
    x_all = row_sums @ labels
    yy = row_sums.sum() - 2.0 * x_all + xx
    xy = x_all - xx
    mmd2 = (xx - n) / (n * (n - 1)) + (yy - m) / (m * (m - 1)) - 2.0 * xy / (n * m)
    p = (np.sum(mmd2[1:] >= mmd2[0]) + 1) / (n_permutations + 1)
    return _result("mmd", mmd2[0], p, alpha, {"mmd2": float(mmd2[0]), "bandwidth": bandwidth, "n_ref": n,
                                              "n_live": m, "n_permutations": int(n_permutations)})


def _top1(probs: np.ndarray) -> np.ndarray:
    return probs.max(1)


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -np.sum(probs * np.log(np.clip(probs, _EPS, 1.0)), axis=1)


def _score_shift(name: str, score, ref_probs, live_probs, alpha: float) -> TestResult:
    _check_alpha(alpha)
    ref, live = _check_pair(ref_probs, live_probs, "probabilities")
    a, b = score(ref), score(live)
    d, p = _ks(a, b)
    return _result(name, d, p, alpha, {"ref_mean": float(a.mean()), "live_mean": float(b.mean()),
                                       "mean_shift": float(b.mean() - a.mean())})


def confidence_shift(ref_probs: np.ndarray, live_probs: np.ndarray, alpha: float = 0.05) -> TestResult:
    """KS on top-1 confidence: blur, noise and unfamiliar inputs typically make the model less sure."""
    return _score_shift("confidence_ks", _top1, ref_probs, live_probs, alpha)


def entropy_shift(ref_probs: np.ndarray, live_probs: np.ndarray, alpha: float = 0.05) -> TestResult:
    """KS on predictive entropy (nats): like confidence, but sees mass spread over the runner-up classes."""
    return _score_shift("entropy_ks", _entropy, ref_probs, live_probs, alpha)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; unlike the normal one it stays inside [0, 1]."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n == 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def estimated_accuracy(ref_probs: np.ndarray, ref_labels: np.ndarray, live_probs: np.ndarray,
                       temperature: float = 1.0) -> dict:
    """Live accuracy without labels: average calibrated confidence, and ATC (Garg et al. 2022)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ref, live = _check_pair(ref_probs, live_probs, "probabilities")
    labels = np.asarray(ref_labels)
    if labels.ndim != 1 or len(labels) != len(ref):
        raise ValueError(f"reference labels must be 1-D with one label per reference row: "
                         f"got shape {labels.shape} for {len(ref)} rows")
    if labels.min() < 0 or labels.max() >= ref.shape[1]:
        raise ValueError(f"reference labels must lie in [0, {ref.shape[1]}), got {labels.min()}..{labels.max()}")
    ref_conf = _top1(apply_temperature(ref, temperature))
    live_conf = _top1(apply_temperature(live, temperature))
    n_correct = int(np.sum(ref.argmax(1) == labels))
    # The threshold leaves exactly n_correct reference confidences above it (ties aside).
    ranked = np.sort(ref_conf)[::-1]
    threshold = float(ranked[n_correct]) if n_correct < len(ranked) else float(np.nextafter(ranked[-1], -np.inf))
    return {
        "average_confidence": float(live_conf.mean()),
        "atc": float(np.mean(live_conf > threshold)),
        "atc_threshold": threshold,
        "reference_accuracy": n_correct / len(ref),
    }


def combine(results: list[TestResult], alpha: float = 0.05) -> tuple[bool, float]:
    """One verdict over several detectors: Bonferroni across them, valid however they correlate."""
    _check_alpha(alpha)
    if not results:
        raise ValueError("combine needs at least one test result")
    p = min(1.0, min(r.p_value for r in results) * len(results))
    return bool(p < alpha), float(p)


def severity(p_value: float) -> float:
    """-log10 p, saturated at 16: comparable between checks of different window sizes and detectors."""
    if not 0.0 <= p_value <= 1.0:
        raise ValueError(f"p_value must lie in [0, 1], got {p_value}")
    return float(-math.log10(max(p_value, MIN_P)))
