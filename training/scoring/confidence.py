"""After training: scores on val and test, and the confidence the service will serve.

The temperature, the conformal threshold and the abstention threshold are fitted on the val split:
data the weights never trained on. Early stopping also read val, but only to pick one of ~12 epochs;
carving a separate calibration split would take it from a training set that, on hymenoptera, is
245 photos. The test split (never used to fit anything) then reports calibration before and after,
the prediction sets' empirical coverage, and the risk-coverage curve.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.calibration import (Calibration, calibration_scores, fit_calibration, reliability_bins, risk_coverage,
                                   set_report)
from exporters.preprocess import ResizePolicy
from training.config import TrainConfig
from training.data.splits import Splits
from training.loop.fit import score_split
from training.run.files import CALIBRATION, write_json
from training.scoring.plots import plot_reliability, plot_risk_coverage

RELIABILITY_PNG = "reliability.png"
RISK_COVERAGE_PNG = "risk_coverage.png"


def score_and_calibrate(model, splits: Splits, policy: ResizePolicy, device, cfg: TrainConfig) -> tuple[dict, Calibration]:
    """({"val", "test" scores, "calibration", "prediction_sets", "risk_coverage"}, the fitted calibration)."""
    val_scores, val_probs, _ = score_split(model, splits.val, policy, device, cfg)
    val_labels = splits.val.labels.numpy()
    calibration = fit_calibration(val_probs, val_labels, cfg.coverage, cfg.target_accuracy, cfg.max_set_size, cfg.seed)
    metrics = {"val": val_scores, "calibration": {
        "fitted_on": "val", **calibration.to_json(),
        "val": {"before": calibration_scores(val_probs, val_labels),
                "after": calibration_scores(calibration.apply(val_probs), val_labels)}}}
    if splits.test is not None and len(splits.test):
        test_scores, test_probs, _ = score_split(model, splits.test, policy, device, cfg)
        metrics["test"] = test_scores
        metrics.update(confidence_report(calibration, test_probs, splits.test.labels.numpy(), splits.test.classes, cfg.seed))
    return metrics, calibration


def confidence_report(calibration: Calibration, probs: np.ndarray, labels: np.ndarray, classes: list[str],
                      seed: int = 0) -> dict:
    """On held-out images: calibration before/after, the sets' coverage and size, accuracy against coverage."""
    calibrated = calibration.apply(probs)
    u = np.random.default_rng(seed + 1).random(len(labels))
    rc = risk_coverage(calibrated, labels)
    return {
        "calibration_test": {"before": calibration_scores(probs, labels), "after": calibration_scores(calibrated, labels),
                             "reliability_before": reliability_bins(probs, labels),
                             "reliability_after": reliability_bins(calibrated, labels)},
        "prediction_sets": set_report(calibration, probs, labels, classes, u),
        "risk_coverage": {"at_coverage": rc["at_coverage"], "curve": _thin(rc["curve"])},
    }


def write_confidence(out: Path, calibration: Calibration, metrics: dict) -> None:
    """calibration.json (what export carries into the bundle) and the two PNGs, drawn on test when there is one."""
    write_json(out / CALIBRATION, calibration.to_json())
    plot_confidence(out, calibration, metrics)


def plot_confidence(out: Path, calibration: Calibration, metrics: dict) -> None:
    if "calibration_test" in metrics:
        report = metrics["calibration_test"]
        before, after = report["before"]["ece"], report["after"]["ece"]
        plot_reliability(report["reliability_before"], report["reliability_after"], out / RELIABILITY_PNG,
                         f"held-out images: ECE {before:.3f} -> {after:.3f} (T = {calibration.temperature:.2f})")
        rc = metrics["risk_coverage"]
        plot_risk_coverage(rc["curve"], rc["at_coverage"], out / RISK_COVERAGE_PNG, "held-out images, calibrated confidence")


def _thin(curve: dict, points: int = 101) -> dict:
    """The curve at most `points` evenly spread images long: enough to draw, small enough for metrics.json."""
    n = len(curve["coverage"])
    keep = np.unique(np.linspace(0, n - 1, num=min(n, points)).round().astype(int))
    return {k: [v[i] for i in keep] for k, v in curve.items()}


def confidence_lines(calibration: Calibration, metrics: dict, where: str = "test split") -> list[str]:
    """What a person reads after training or evaluating: calibration, sets, accuracy against coverage."""
    lines = [f"calibration (fitted on val, {calibration.n_calibration} images): temperature {calibration.temperature:.3f}"]
    if "calibration_test" in metrics:
        b, a = metrics["calibration_test"]["before"], metrics["calibration_test"]["after"]
        lines.append(f"{where}: ECE {b['ece']:.3f} -> {a['ece']:.3f}, NLL {b['nll']:.3f} -> {a['nll']:.3f}, "
                     f"Brier {b['brier']:.3f} -> {a['brier']:.3f}")
        sets = metrics["prediction_sets"]
        lines.append(f"prediction sets ({sets['target']:.0%} target): coverage {sets['coverage']:.3f}, "
                     f"mean size {sets['mean_set_size']:.2f}, empty {sets['empty_sets']:.1%}")
        at = metrics["risk_coverage"]["at_coverage"]
        lines.append("accuracy when answering the most confident " + ", ".join(
            f"{float(k):.0%}: {v['accuracy']:.4f} (confidence >= {v['threshold']:.3f})" for k, v in at.items()))
    if calibration.abstain_below_confidence is not None:
        lines.append(f"abstains below calibrated confidence {calibration.abstain_below_confidence:.4f}")
    if calibration.abstain_above_set_size is not None:
        lines.append(f"abstains when the prediction set has more than {calibration.abstain_above_set_size} classes")
    return lines
