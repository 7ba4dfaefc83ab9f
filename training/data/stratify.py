"""Pure split logic: stratified, seeded hold-outs and k-fold partitions over label arrays."""
from __future__ import annotations

import numpy as np

from training.errors import TrainingError


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): about `fraction` of each class held out, at least one per class
    whenever the class has two or more items. Same seed, same split."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = int(np.floor(len(idx) * fraction + 0.5))  # half-up: round() would round 4.5 to 4
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        else:
            n = 0
        held.extend(idx[:n].tolist())
    held_arr = np.array(sorted(held), dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_arr)
    return keep, held_arr


def stratified_kfold(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train_idx, test_idx)] * folds; test folds are disjoint and cover every index once."""
    labels = np.asarray(labels)
    if folds < 2:
        raise TrainingError(f"--folds must be at least 2, got {folds}")
    counts = np.bincount(labels)
    smallest = counts[counts > 0].min()
    if smallest < folds:
        raise TrainingError(
            f"the smallest class has {smallest} images, fewer than --folds {folds}; use --folds {max(2, smallest)} or add images"
        )
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        # Round-robin from a random offset keeps fold sizes within one of each other per class.
        fold_of[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    out = []
    for k in range(folds):
        test = np.flatnonzero(fold_of == k)
        train = np.flatnonzero(fold_of != k)
        out.append((train, test))
    return out
