"""The adaptive batcher: concurrent requests share ONNX Runtime calls, each gets its own rows back."""
from __future__ import annotations

import asyncio
import threading

import numpy as np

from service.batcher import AdaptiveBatcher


class _RecordingModel:
    def __init__(self, n_classes=3):
        self.calls: list[int] = []
        self.n_classes = n_classes
        self.lock = threading.Lock()

    def run(self, images):
        with self.lock:
            self.calls.append(len(images))
        flat = images.reshape(len(images), -1).astype(np.float32)
        probs = np.tile(flat[:, :1], (1, self.n_classes))  # each image's first pixel: lets tests check routing
        return probs, flat[:, :2]


def _images(values):
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])


def test_concurrent_requests_share_batches_and_get_their_own_results():
    async def main():
        model = _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=16, max_latency_ms=50)
        batcher.start()
        results = await asyncio.gather(*(batcher.run(model, _images([i, i])) for i in range(20)))
        await batcher.stop()
        return model, results

    model, results = asyncio.run(main())
    for i, (probs, embs) in enumerate(results):
        assert probs.shape == (2, 3) and np.all(probs == i)
    assert sum(model.calls) == 40 and max(model.calls) == 16 and len(model.calls) <= 4


def test_images_for_different_models_never_share_a_batch():
    async def main():
        old, new = _RecordingModel(), _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=32, max_latency_ms=20)
        batcher.start()
        await asyncio.gather(*(batcher.run(old if i % 2 else new, _images([i])) for i in range(10)))
        await batcher.stop()
        return old, new

    old, new = asyncio.run(main())
    assert sum(old.calls) == 5 and sum(new.calls) == 5


def test_a_lone_image_runs_at_once_instead_of_waiting_for_the_deadline():
    # With nothing else on its way, waiting for the batch to fill only adds latency: a one-minute
    # max_latency_ms must not hold a lone request (wait_for fails the test long before a minute).
    async def main():
        model = _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=32, max_latency_ms=60_000)
        batcher.start()
        for i in range(3):
            probs, _ = await asyncio.wait_for(batcher.run(model, _images([i])), 10)
            assert np.all(probs == i)
        await batcher.stop()
        return model

    assert asyncio.run(main()).calls == [1, 1, 1]


def test_a_batch_waits_for_an_image_still_being_decoded():
    async def main():
        model = _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=32, max_latency_ms=60_000)
        batcher.start()
        with batcher.on_the_way(1):  # a second request is decoding while the first is queued
            first = asyncio.create_task(batcher.run(model, _images([1])))
            await asyncio.sleep(0.05)
            assert not first.done()
        second = await asyncio.wait_for(batcher.run(model, _images([2])), 10)
        (p1, _), (p2, _) = await first, second
        await batcher.stop()
        return model, p1, p2

    model, p1, p2 = asyncio.run(main())
    assert model.calls == [2] and np.all(p1 == 1) and np.all(p2 == 2)


def test_a_failed_decode_does_not_leave_the_batcher_waiting():
    async def main():
        model = _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=32, max_latency_ms=60_000)
        batcher.start()
        try:
            with batcher.on_the_way(2):
                raise ValueError("undecodable upload")
        except ValueError:
            pass
        await asyncio.wait_for(batcher.run(model, _images([3])), 10)
        await batcher.stop()
        return model

    assert asyncio.run(main()).calls == [1]


class _TwoWayModel(_RecordingModel):
    """Records which entry point ran each batch: `run` (the single-threaded calls side by side) or
    `run_alone` (every core, for a batch with nothing else running or waiting)."""

    def __init__(self, slow_s=0.0):
        super().__init__()
        self.ways: list[str] = []
        self.slow_s = slow_s

    def run(self, images):
        import time

        with self.lock:
            self.ways.append("run")
        time.sleep(self.slow_s)
        return super().run(images)

    def run_alone(self, images):
        with self.lock:
            self.ways.append("run_alone")
        return super().run(images)


def test_a_lone_request_runs_alone_and_batches_under_load_run_side_by_side():
    async def main():
        lone, busy = _TwoWayModel(), _TwoWayModel(slow_s=0.05)
        batcher = AdaptiveBatcher(max_batch_size=2, max_latency_ms=1, concurrent_batches=2)
        batcher.start()
        for i in range(3):  # one at a time: nothing else running or queued
            await batcher.run(lone, _images([i]))
        # 12 at once through 2 slots of 2 images: batches queue behind running ones.
        results = await asyncio.gather(*(batcher.run(busy, _images([i])) for i in range(12)))
        await batcher.stop()
        return lone, busy, results

    lone, busy, results = asyncio.run(main())
    assert lone.ways == ["run_alone"] * 3
    assert busy.ways.count("run") >= 4, busy.ways  # at most the first and the last batch may find the machine to themselves
    assert all(np.all(probs == i) for i, (probs, _) in enumerate(results))
