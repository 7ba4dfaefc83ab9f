"""Cheap live drift scores over a rolling window of predictions (pure numpy, no I/O).

Two numbers a dashboard can alert on, updated per batch: the PSI of the predicted-class
distribution against the class prior the bundle's reference set had, and the shift of mean
top-1 confidence against the reference mean. The full drift report (embeddings, per-feature tests)
is a separate, offline job; these only say "look now".
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

from exporters.reference_stats import psi


@dataclass(frozen=True)
class DriftScores:
    window: int
    class_psi: float
    confidence_shift: float  # live mean confidence - reference mean confidence
    mean_confidence: float


class LiveDrift:
    """Rolling window of (predicted class, confidence) compared with one model's reference."""

    def __init__(self, class_prior: np.ndarray, reference_confidence: float | None, window: int):
        self.class_prior = np.asarray(class_prior, dtype=np.float64)
        self.reference_confidence = reference_confidence
        self._classes: collections.deque[int] = collections.deque(maxlen=window)
        self._confidences: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, predicted: np.ndarray, confidence: np.ndarray) -> DriftScores:
        with self._lock:
            self._classes.extend(int(c) for c in predicted)
            self._confidences.extend(float(c) for c in confidence)
            return self.scores()

    def scores(self) -> DriftScores:
        n = len(self._classes)
        if n == 0:
            return DriftScores(0, 0.0, 0.0, 0.0)
        counts = np.bincount(np.fromiter(self._classes, int, n), minlength=len(self.class_prior))
        mean_conf = float(np.mean(np.fromiter(self._confidences, float, n)))
        shift = mean_conf - self.reference_confidence if self.reference_confidence is not None else 0.0
        return DriftScores(n, psi(self.class_prior, counts[: len(self.class_prior)]), shift, mean_conf)
