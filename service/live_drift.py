"""Cheap live drift scores over a rolling window of predictions (pure numpy, no I/O).

Two numbers a dashboard can alert on, updated per batch: the PSI of the predicted-class
distribution against the class prior the bundle's reference set had, and the shift of mean
top-1 confidence against the reference mean. The full drift report (embeddings, per-feature tests)
is a separate, offline job; these only say "look now".
"""
from __future__ import annotations

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
    """Rolling window of (predicted class, confidence) compared with one model's reference.

    A ring buffer with running class counts and confidence sum: a request's update costs O(its
    images + classes), not O(window). Recounting the 500-entry window per request cost ~0.09 ms of
    event-loop CPU per request (bench/request_cost.py)."""

    def __init__(self, class_prior: np.ndarray, reference_confidence: float | None, window: int):
        self.class_prior = np.asarray(class_prior, dtype=np.float64)
        self.reference_confidence = reference_confidence
        self.window = window
        self._classes = np.zeros(window, dtype=np.int64)
        self._confidences = np.zeros(window, dtype=np.float64)
        self._filled = 0
        self._next = 0
        self._counts = np.zeros(len(self.class_prior), dtype=np.int64)
        self._confidence_sum = 0.0
        self._lock = threading.Lock()

    def _count(self, classes: np.ndarray) -> np.ndarray:
        k = len(self.class_prior)
        return np.bincount(classes, minlength=k)[:k]  # a class the prior does not have is not counted

    def observe(self, predicted: np.ndarray, confidence: np.ndarray) -> DriftScores:
        predicted = np.asarray(predicted, dtype=np.int64).ravel()[-self.window:]
        confidence = np.asarray(confidence, dtype=np.float64).ravel()[-self.window:]
        with self._lock:
            slots = (self._next + np.arange(len(predicted))) % self.window
            replaced = slots[slots < self._filled]  # the window fills from slot 0 up
            if len(replaced):
                self._counts -= self._count(self._classes[replaced])
                self._confidence_sum -= float(self._confidences[replaced].sum())
            self._classes[slots] = predicted
            self._confidences[slots] = confidence
            self._counts += self._count(predicted)
            self._confidence_sum += float(confidence.sum())
            self._filled = min(self.window, self._filled + len(predicted))
            wrapped = self._next + len(predicted) >= self.window
            self._next = (self._next + len(predicted)) % self.window
            if wrapped:  # once per window, so the running sum's rounding never accumulates
                self._confidence_sum = float(self._confidences[:self._filled].sum())
            return self.scores()

    def scores(self) -> DriftScores:
        n = self._filled
        if n == 0:
            return DriftScores(0, 0.0, 0.0, 0.0)
        mean_conf = self._confidence_sum / n
        shift = mean_conf - self.reference_confidence if self.reference_confidence is not None else 0.0
        return DriftScores(n, psi(self.class_prior, self._counts), shift, mean_conf)
