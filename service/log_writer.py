"""Prediction records leave the request path: a bounded queue drained by one thread in batches.

The durability contract (README, "The prediction log"):
- A prediction is answered before its record is committed. A crash (SIGKILL, OOM, power) loses at
  most the records still queued: at most `log_queue_size`, shown live by cnnloop_log_queue_records.
  A clean stop (SIGTERM) drains the queue first, for up to `log_drain_timeout_s`.
- When the store is slow or down, predictions never fail and never wait for it: the writer keeps
  retrying its batch (backing off to 5 s) while the queue fills, and once it is full new records
  are dropped, counted (cnnloop_log_dropped_records) and logged, and the answer says logged=false.
  Waiting instead would hand the store's latency back to every client, the very coupling this
  queue removes; the log is a sample for drift and retraining, the answer is the product.
- Feedback and labeled uploads do not go through here: an acknowledged label is committed.
- `log_queue_size: 0` writes each request's records before it answers (the old synchronous path),
  for deployments that need every answered prediction on disk and accept the latency.

Batches close at `log_batch_size` records or when their oldest record is `log_flush_interval_ms`
old, like the inference batcher; one batch is one multi-row INSERT. Images a batch stores are
written first (so a committed record never points at a missing image), in parallel (S3 PUTs are
round trips), and hashes stored recently are remembered so a repeat costs no existence check.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from exporters.prediction_log.records import PredictionLog, PredictionRecord

log = logging.getLogger("cnnloop.service.log")

_MAX_BACKOFF_S = 5.0
_RECENT_IMAGES = 50_000  # hashes remembered as stored (about 7 MB)
_WARNING_EVERY_S = 10.0


# An image to store: its bytes, or a function the writer's threads call for them (an encode kept off
# the request path).
StoredImage = bytes | Callable[[], bytes]


@dataclass
class _Entry:
    records: list[PredictionRecord]
    images: list[tuple[str, StoredImage]]


class LogWriter:
    def __init__(self, prediction_log: PredictionLog, metrics, capacity: int, batch_size: int,
                 flush_interval_s: float, image_threads: int = 4,
                 register_thread: Callable[[str], None] = lambda role: None):
        self.log = prediction_log
        self.metrics = metrics
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._queue: deque[tuple[float, _Entry]] = deque()
        self._queued = 0  # records in the queue and in the batch being written
        self._in_queue = 0  # records in the queue alone
        self._abandoned = False  # close() gave up waiting: the thread must stop touching the counts
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._closing = False
        self._flush_wanted = 0
        self._written_seq = 0  # entries committed so far, in submission order
        self._submitted_seq = 0
        self._recent_images: OrderedDict[str, None] = OrderedDict()
        self._register_thread = register_thread
        self._image_pool = ThreadPoolExecutor(image_threads, thread_name_prefix="cnnloop-log-images",
                                              initializer=lambda: register_thread("log_images"))
        self._thread: threading.Thread | None = None
        self._images_lock = threading.Lock()  # synchronous mode writes from several request threads
        self._dropped_since_warning = 0
        self._last_warning = float("-inf")
        if capacity > 0:
            self._thread = threading.Thread(target=self._run, name="cnnloop-log-writer", daemon=True)
            self._thread.start()

    @property
    def queued(self) -> int:
        """Records answered and not yet committed: what a crash now would lose."""
        return self._queued

    @property
    def synchronous(self) -> bool:
        return self.capacity == 0

    # request side ------------------------------------------------------------------------------

    def submit(self, records: list[PredictionRecord], images: list[tuple[str, StoredImage]]) -> bool:
        """Queue one request's records; False (and counted) when the queue has no room for them."""
        if self.synchronous:
            return self._write_now(records, images)
        with self._cond:
            if self._closing or self._queued + len(records) > self.capacity:
                self._drop(len(records), "stopping" if self._closing else "queue_full")
                return False
            self._queue.append((time.monotonic(), _Entry(records, images)))
            self._queued += len(records)
            self._in_queue += len(records)
            self._submitted_seq += 1
            self._pending.update(r.prediction_id for r in records)
            self.metrics.log_queue.set(self._queued)
            # Wake the writer only when it has something new to decide: a first record (it waits for
            # the batch's age) or a full batch. A wake-up per request costs GIL hand-offs on the hot path.
            if len(self._queue) == 1 or self._in_queue >= self.batch_size:
                self._cond.notify_all()
        return True

    def pending(self, prediction_id: str) -> bool:
        with self._cond:
            return prediction_id in self._pending

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is committed; False if `timeout` passed first."""
        if self.synchronous:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted_seq
            self._flush_wanted += 1
            self._cond.notify_all()
            try:
                while self._written_seq < target:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._flush_wanted -= 1

    def close(self, timeout: float) -> int:
        """Drain for up to `timeout` seconds, then stop; returns the records left unwritten (lost)."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(timeout)
        with self._cond:
            self._abandoned = True
            lost = self._queued
            if lost:
                self._drop(lost, "stopping")
                log.error("stopped with %d prediction records unwritten (the store did not drain in %.0f s)", lost, timeout)
            self._queue.clear()
            self._queued = 0
            self._pending.clear()
        self._image_pool.shutdown(wait=False, cancel_futures=True)
        return lost

    # writer side -------------------------------------------------------------------------------

    def _drop(self, n: int, reason: str) -> None:
        self.metrics.log_dropped.labels(reason).inc(n)
        self._dropped_since_warning += n
        now = time.monotonic()
        if now - self._last_warning >= _WARNING_EVERY_S:  # a log line per drop would flood the logs under load
            log.warning("prediction log dropped %d records (%s) since the last warning: the store is slower than "
                        "the traffic; see cnnloop_log_dropped_records", self._dropped_since_warning, reason)
            self._dropped_since_warning, self._last_warning = 0, now

    def _next_batch(self) -> list[_Entry] | None:
        """Under the lock: wait for a full or old-enough batch; None when closed and drained."""
        while not self._queue:
            if self._closing:
                return None
            self._cond.wait()
        deadline = self._queue[0][0] + self.flush_interval_s
        while (self._in_queue < self.batch_size and not self._closing
               and not self._flush_wanted and time.monotonic() < deadline):
            self._cond.wait(max(0.0, deadline - time.monotonic()))
        batch, n = [], 0
        while self._queue and (n == 0 or n + len(self._queue[0][1].records) <= self.batch_size):
            entry = self._queue.popleft()[1]
            batch.append(entry)
            n += len(entry.records)
        self._in_queue -= n
        return batch

    def _run(self) -> None:
        self._register_thread("log_writer")
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            records = [r for e in batch for r in e.records]
            images = [img for e in batch for img in e.images]
            backoff = 0.1
            while not self._write_now(records, images):
                if self._abandoned:  # close() counted these as lost
                    return
                time.sleep(backoff)
                backoff = min(_MAX_BACKOFF_S, backoff * 2)
            with self._cond:
                if self._abandoned:
                    return
                self._queued -= len(records)
                self._written_seq += len(batch)
                self._pending.difference_update(r.prediction_id for r in records)
                self.metrics.log_queue.set(self._queued)
                self._cond.notify_all()

    def _store_images(self, images: list[tuple[str, StoredImage]]) -> None:
        with self._images_lock:
            todo = {sha: data for sha, data in images if sha not in self._recent_images}
        for future in [self._image_pool.submit(self._store_one, sha, data) for sha, data in todo.items()]:
            future.result()
        with self._images_lock:
            for sha in todo:
                self._recent_images[sha] = None
                if len(self._recent_images) > _RECENT_IMAGES:
                    self._recent_images.popitem(last=False)

    def _store_one(self, sha: str, data: StoredImage) -> None:
        self.log.store_image(sha, data() if callable(data) else data)

    def _write_now(self, records: list[PredictionRecord], images: list[tuple[str, StoredImage]]) -> bool:
        try:
            self._store_images(images)
            self.log.add_predictions(records)
        except Exception:
            log.exception("prediction log write failed (%d records)%s", len(records),
                          "" if self.synchronous else "; the writer retries them")
            self.metrics.log_write_failures.inc()
            return False
        self.metrics.stored_inputs.inc(len(images))
        self.metrics.log_written.inc(len(records))
        return True
