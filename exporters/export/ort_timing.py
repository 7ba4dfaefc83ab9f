"""Images/s and latency of several ONNX graphs under ONNX Runtime, timed fairly in one process.

Graphs are timed in interleaved round-robin rounds (A at batch 1, A at batch 32, B at batch 1, ...,
then again): a neighbour's burst of CPU use or a clock step lands on every graph a little instead
of on whichever one happened to run then. torch-free, like the service that runs these graphs.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np

from exporters.onnx_runtime import OnnxClassifier


def time_round_robin(classifiers: Mapping[str, OnnxClassifier], batch_sizes: Sequence[int] = (1, 32),
                     seconds: float = 2.0, rounds: int = 4, warmup_calls: int = 3, seed: int = 0,
                     on_slot: Callable[[str, int], None] | None = None) -> dict[str, dict[int, dict]]:
    """{name: {batch: {images_per_s, p50_ms, p90_ms, calls, seconds}}}: each (graph, batch) runs for
    `seconds` in all, split over `rounds` slots, after `warmup_calls` untimed calls. Latency is one
    `run` call (the whole batch); images/s is images over the summed time of the timed calls."""
    # Random pixels: a CNN's cost does not depend on what the image shows, only on its size.
    rng = np.random.default_rng(seed)
    inputs = {name: {b: rng.integers(0, 256, (b, c.image_size, c.image_size, 3), dtype=np.uint8) for b in batch_sizes}
              for name, c in classifiers.items()}
    for name, c in classifiers.items():
        for b in batch_sizes:
            for _ in range(warmup_calls):
                c.run(inputs[name][b])
    latencies: dict[tuple[str, int], list[float]] = {(n, b): [] for n in classifiers for b in batch_sizes}
    slot = seconds / max(1, rounds)
    for _ in range(max(1, rounds)):
        for name, c in classifiers.items():
            for b in batch_sizes:
                batch, spent = inputs[name][b], latencies[(name, b)]
                stop_at = time.perf_counter() + slot
                while True:  # at least one call per slot, however slow the graph
                    t0 = time.perf_counter()
                    c.run(batch)
                    t1 = time.perf_counter()
                    spent.append(t1 - t0)
                    if t1 >= stop_at:
                        break
                if on_slot is not None:
                    on_slot(name, b)
    result: dict[str, dict[int, dict]] = {}
    for (name, b), lat in latencies.items():
        ms = np.asarray(lat) * 1000.0
        result.setdefault(name, {})[b] = {
            "images_per_s": float(b * len(lat) / sum(lat)), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "calls": len(lat), "seconds": float(sum(lat)),
        }
    return result
