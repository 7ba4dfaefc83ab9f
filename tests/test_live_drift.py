"""The live drift gauges: PSI of predicted classes and confidence shift over a rolling window."""
from __future__ import annotations

import numpy as np
import pytest

from exporters.reference_stats import psi
from service.live_drift import LiveDrift


def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift():
    prior = np.array([0.5, 0.3, 0.2])
    assert psi(prior, prior * 100) == pytest.approx(0.0, abs=1e-12)
    assert psi(prior, [10, 30, 60]) > psi(prior, [45, 35, 20]) > 0


def test_live_drift_window_keeps_only_recent_predictions():
    drift = LiveDrift(np.array([0.5, 0.5]), reference_confidence=0.9, window=10)
    drift.observe(np.zeros(50, int), np.full(50, 0.6))
    scores = drift.observe(np.ones(10, int), np.full(10, 0.8))
    assert scores.window == 10
    assert scores.confidence_shift == pytest.approx(-0.1)
    assert scores.class_psi > 1  # the window holds only class 1 now


def test_the_running_window_agrees_with_recounting_it_at_every_step():
    rng = np.random.default_rng(0)
    prior = np.array([0.2, 0.3, 0.5])
    drift = LiveDrift(prior, reference_confidence=0.7, window=37)
    seen_classes, seen_conf = [], []
    for step in range(200):
        m = int(rng.choice([1, 2, 5, 36, 37, 60]))
        classes, conf = rng.integers(0, 3, m), rng.random(m)
        scores = drift.observe(classes, conf)
        seen_classes.extend(classes)
        seen_conf.extend(conf)
        window_classes, window_conf = np.array(seen_classes[-37:]), np.array(seen_conf[-37:])
        assert scores.window == len(window_classes), step
        assert scores.class_psi == pytest.approx(psi(prior, np.bincount(window_classes, minlength=3)), abs=1e-12), step
        assert scores.mean_confidence == pytest.approx(window_conf.mean(), abs=1e-9), step
        assert scores.confidence_shift == pytest.approx(window_conf.mean() - 0.7, abs=1e-9), step
