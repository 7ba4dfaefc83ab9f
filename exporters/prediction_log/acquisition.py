"""Which unlabeled predictions are worth a person's time: acquisition scores and batch spreading. Pure numpy.

Scores are absolute (not ranks), so items queued at different times compare: higher first.
- random: a seeded uniform draw per image digest (the baseline every other strategy must beat);
- margin: 1 - (top-1 - top-2 probability): the closest calls first;
- entropy: Shannon entropy of the (calibrated) probabilities;
- novelty: mean distance to the k nearest reference embeddings (the bundle's validation sample, in
  its PCA space): images unlike anything the model was validated on.
A batch a reviewer takes is then spread over the embedding space (`spread_batch`): from the best
candidates, greedily the one that is far from those already picked, weighted by its rank, so one
batch is not twenty near-copies of one image.
"""
from __future__ import annotations

import hashlib

import numpy as np

STRATEGIES = ("margin", "entropy", "novelty", "random")
NOVELTY_NEIGHBOURS = 5


def random_scores(keys: list[str], seed: int = 0) -> np.ndarray:
    """A uniform draw per key (the review queue keys by image digest) that does not depend on the order
    they are scored in."""
    return np.array([int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:13], 16) / 16**13 for key in keys])


def margin_scores(probs: np.ndarray) -> np.ndarray:
    top2 = -np.sort(-probs, axis=1)[:, :2]
    second = top2[:, 1] if probs.shape[1] > 1 else np.zeros(len(probs))
    return 1.0 - (top2[:, 0] - second)


def entropy_scores(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def novelty_scores(embeddings: np.ndarray, reference: np.ndarray, k: int = NOVELTY_NEIGHBOURS) -> np.ndarray:
    """Mean Euclidean distance to the k nearest reference embeddings (same space, e.g. the bundle's PCA)."""
    x = np.asarray(embeddings, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    d2 = (x * x).sum(1)[:, None] - 2 * x @ ref.T + (ref * ref).sum(1)[None, :]
    k = min(k, ref.shape[0])
    nearest = np.sqrt(np.clip(np.partition(d2, k - 1, axis=1)[:, :k], 0, None))
    return nearest.mean(axis=1)


def acquisition_scores(strategy: str, keys: list[str], probs: np.ndarray,
                       embeddings: np.ndarray | None = None, reference: np.ndarray | None = None) -> np.ndarray:
    if strategy == "random":
        return random_scores(keys)
    if strategy == "margin":
        return margin_scores(probs)
    if strategy == "entropy":
        return entropy_scores(probs)
    if strategy == "novelty":
        if embeddings is None or reference is None or len(reference) == 0:
            raise ValueError("novelty needs the predictions' embeddings and the bundle's reference sample in the same "
                             "space (CNNLOOP_STORE_EMBEDDINGS on, a bundle with a reference PCA)")
        return novelty_scores(embeddings, reference)
    raise ValueError(f"unknown acquisition strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def spread_batch(scores: np.ndarray, embeddings: np.ndarray | None, k: int) -> list[int]:
    """Indices of k candidates: the best first, then each next one maximising its rank weight x its
    distance to the nearest already picked (embeddings normalised to unit length). Without embeddings: the top k."""
    n = len(scores)
    k = min(k, n)
    order = list(np.argsort(-scores, kind="stable"))
    if embeddings is None or k <= 1:
        return [int(i) for i in order[:k]]
    x = np.asarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # Rank weights (best 1, worst 1/n): a score band far above the rest (abstained answers, +1e6)
    # must not make a near-copy of the best beat a distinct image, nor the worst weigh nothing.
    s = np.empty(n)
    s[np.array(order)] = np.linspace(1.0, 1.0 / n, n)
    picked = [int(order[0])]
    nearest = np.linalg.norm(x - x[picked[0]], axis=1)
    for _ in range(k - 1):
        gain = s * nearest
        gain[picked] = -1.0
        nxt = int(np.argmax(gain))
        picked.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[nxt], axis=1))
    return picked
