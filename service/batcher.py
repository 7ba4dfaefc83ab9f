"""Adaptive batching: images from concurrent requests share one inference call.

Why not `@bentoml.api(batchable=True)`: its dispatcher batches one API argument, so per-request
validation (decode errors must be that request's 4xx) and per-image bookkeeping would run inside the
merged batch; calling a batchable API from another API goes through BentoML's self-proxy (HTTP
serialisation of the arrays); and its dispatcher answers 503 when its latency estimate exceeds
max_latency_ms, which a client sees as a failed request under load. This batcher never refuses.

Policy: a batch starts when its first image arrives and closes when it holds `max_batch_size` images,
when that image has waited `max_latency_ms`, or at once when no other image is on its way (none is
being decoded: `on_the_way`), since waiting then only adds latency. While one batch runs, the next
one fills, so the batch size follows the load with no added wait under load (the deadline has
already passed) and none for a lone request. Images decoded for different models (a swap happened
in between) never share a batch: each image runs on the model its request snapshotted.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np


class BatchModel(Protocol):
    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    # Optional: `run_alone(images)`, called instead of `run` for a batch with no other batch running or
    # waiting (a lone request can use every core; see LoadedModel.run_alone).


@dataclass
class _Item:
    model: BatchModel
    image: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class AdaptiveBatcher:
    """Queue of single images -> batched `model.run` calls on one inference thread."""

    def __init__(self, max_batch_size: int, max_latency_ms: float,
                 on_batch: Callable[[int, float], Any] | None = None, concurrent_batches: int = 1,
                 thread_initializer: Callable[[], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_latency_s = max(0.0, max_latency_ms) / 1000.0
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._executor = ThreadPoolExecutor(max_workers=concurrent_batches, thread_name_prefix="cnnloop-infer",
                                            initializer=thread_initializer)
        self._slots = asyncio.Semaphore(concurrent_batches)
        self._queue: asyncio.Queue[_Item] | None = None
        self._carry: collections.deque[_Item] = collections.deque()
        self._task: asyncio.Task | None = None
        self._on_the_way = 0  # images being decoded that will be run next
        self._running = 0  # batches in inference calls now

    @contextlib.contextmanager
    def on_the_way(self, n: int):
        """Wrap the decoding of `n` images that `run` will get: a batch waits for them, never for nothing."""
        self._on_the_way += n
        try:
            yield
        finally:
            self._on_the_way -= n

    def _nothing_waiting(self) -> bool:
        return self._on_the_way == 0 and not self._carry and (self._queue is None or self._queue.empty())

    async def decode_and_run(self, model: BatchModel, decoders: list[Callable[[], tuple]],
                             executor: Executor) -> tuple[list[tuple], np.ndarray, np.ndarray]:
        """One request's images: each decoder (run in `executor`) returns a tuple whose first item is
        the model input; returns (those tuples, probabilities, embeddings), batched with other requests.

        A lone image with nothing else running or on its way decodes and runs in one trip to the
        executor, on `run_alone`: through the queue it would cross threads twice more (executor ->
        loop -> inference thread -> loop) for a batch of one anyway (0.3 ms of p50 at concurrency 1 on
        2 cores, bench/serve_wrk.py). Requests arriving meanwhile see a batch running."""
        loop = asyncio.get_running_loop()
        if len(decoders) == 1 and self._running == 0 and self._nothing_waiting():
            self._running += 1
            try:
                prepared, probs, embs = await loop.run_in_executor(executor, self._decode_and_run_alone, model, decoders[0])
            finally:
                self._running -= 1
            return [prepared], probs, embs
        with self.on_the_way(len(decoders)):
            prepared = await asyncio.gather(*(loop.run_in_executor(executor, decode) for decode in decoders))
        probs, embs = await self.run(model, np.stack([p[0] for p in prepared]))
        return prepared, probs, embs

    def _decode_and_run_alone(self, model: BatchModel, decode: Callable[[], tuple]) -> tuple[tuple, np.ndarray, np.ndarray]:
        prepared = decode()
        start = time.perf_counter()
        probs, embs = getattr(model, "run_alone", model.run)(prepared[0][None])
        self._on_batch(1, time.perf_counter() - start)
        return prepared, probs, embs

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="cnnloop-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, model: BatchModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and embeddings of `images` (N,H,W,3 uint8) under `model`, batched with others."""
        if self._task is None:
            raise RuntimeError("AdaptiveBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            fut = loop.create_future()
            self._queue.put_nowait(_Item(model, image, fut))
            futures.append(fut)
        results = await asyncio.gather(*futures)
        return np.stack([p for p, _ in results]), np.stack([e for _, e in results])

    async def _next_item(self, timeout: float | None) -> _Item | None:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[_Item]:
        first = await self._next_item(None)
        batch = [first]
        deadline = first.enqueued + self.max_latency_s
        deferred = []
        while len(batch) < self.max_batch_size:
            wait = deadline - time.perf_counter() if self._on_the_way > 0 else 0.0
            item = await self._next_item(wait)
            if item is None:
                break
            (batch if item.model is first.model else deferred).append(item)
        self._carry.extend(deferred)
        return [it for it in batch if not it.future.done()]  # done = its request was cancelled

    async def _loop(self) -> None:
        while True:
            # A free inference slot first, then the batch: images keep queueing (and the batch keeps
            # growing) while every slot is busy.
            await self._slots.acquire()
            batch = await self._collect()
            if not batch:
                self._slots.release()
                continue
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[_Item]) -> None:
        self._running += 1
        try:
            images = np.stack([it.image for it in batch])
            model = batch[0].model
            alone = self._running == 1 and self._nothing_waiting()
            run = getattr(model, "run_alone", model.run) if alone else model.run
            start = time.perf_counter()
            try:
                probs, embs = await asyncio.get_running_loop().run_in_executor(self._executor, run, images)
            except Exception as e:  # a failing graph fails these requests, never the loop
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                return
            self._on_batch(len(batch), time.perf_counter() - start)
            for i, it in enumerate(batch):
                if not it.future.done():
                    it.future.set_result((probs[i], embs[i]))
        finally:
            self._running -= 1
            self._slots.release()
