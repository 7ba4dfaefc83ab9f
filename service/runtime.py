"""What the service does, without HTTP: predict, feedback, labeled uploads, info, reload, polling.

The BentoML class and the Starlette routes only validate, call one method here and shape the
answer; tests can drive a `ServingRuntime` directly in an event loop.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from exporters.onnx_runtime import choose_providers
from exporters.prediction_log.records import (PredictionLog, PredictionRecord, is_record_id, new_record_id,
                                      record_time)
from exporters.prediction_log.sql import open_prediction_log
from exporters.preprocess import ResizePolicy
from exporters.model_store.registry import Registry
from service.batcher import AdaptiveBatcher
from service.cpu_stages import CpuStages
from service.errors import NotFound, NotReady, Unprocessable
from service.live_drift import LiveDrift
from service.log_writer import LogWriter, StoredImage
from service.metrics import ServiceMetrics
from service.model_session import CheckOutcome, LoadedModel, ModelSession
from service.predictions import (Classification, build_prediction_record, calibrate_batch, embeddings_to_log, model_input,
                                 lossless_image_bytes, pixels_sha256, predict_answer, prediction_answer, top_k)
from service.request_validation import FeedbackIn, PixelImage, Upload
from service.review_desk import ReviewDesk
from service.settings import ServiceSettings

log = logging.getLogger("cnnloop.service")


def open_registry(settings: ServiceSettings) -> Registry:
    return Registry.open(settings.registry, endpoint_url=settings.s3_endpoint_url)


def open_service_log(settings: ServiceSettings) -> PredictionLog:
    return open_prediction_log(settings.data_dir, settings.s3_endpoint_url, settings.log_url)


# How long a feedback on a prediction still in this replica's log queue waits for its commit.
_PENDING_FEEDBACK_WAIT_S = 10.0
# Beyond the flush interval, how long a feedback waits for a recent prediction another replica queued.
_OTHER_REPLICA_MARGIN_S = 2.0


class ServingRuntime:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None,
                 prediction_log: Callable[[ServiceSettings], PredictionLog] = open_service_log,
                 registry: Callable[[ServiceSettings], Registry] = open_registry):
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.cpu = CpuStages(settings.cpu_stages)
        self._open_log = prediction_log
        self.log: PredictionLog | None = None
        gpu = settings.prefer_gpu and "CUDAExecutionProvider" in choose_providers(prefer_gpu=True)
        ort_threads, inference_threads = settings.resolved_inference_threads(gpu)
        lone_threads = settings.resolved_lone_threads(gpu)
        self.models = ModelSession(settings, lambda: registry(settings), on_swap=self._swapped,
                                   on_failure=lambda version, error: self.metrics.model_loads.labels("failed").inc(),
                                   ort_threads=ort_threads, lone_threads=lone_threads)
        self.batcher = AdaptiveBatcher(settings.batch_max_size, settings.batch_max_latency_ms, self.metrics.record_batch,
                                       concurrent_batches=inference_threads, thread_initializer=self.cpu.initializer("inference"))
        self.threads = {"ort_intra_op": ort_threads, "ort_intra_op_lone_batch": lone_threads or ort_threads,
                        "inference_calls": inference_threads,
                        "decode": settings.resolved_decode_threads()}
        self._decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="cnnloop-decode",
                                               initializer=self.cpu.initializer("decode"))
        self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="cnnloop-log", initializer=self.cpu.initializer("io"))
        self.writer: LogWriter | None = None
        self.review: ReviewDesk | None = None  # once the log is open
        self._drift: LiveDrift | None = None
        self._labels_seen: dict[str, list[str]] = {}
        self._feedback_counts = [0, 0]  # labeled predictions, of which predicted right
        self._poller: asyncio.Task | None = None
        self.started_at = time.time()

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.cpu.register_thread("event_loop")
        self.log = await asyncio.to_thread(self._open_log, self.settings)
        s = self.settings
        self.writer = LogWriter(self.log, self.metrics, s.log_queue_size, s.log_batch_size, s.log_flush_interval_ms / 1000,
                                register_thread=self.cpu.register_thread)
        self._feedback_counts = list(await asyncio.to_thread(self.log.feedback_summary))
        self.review = ReviewDesk(self)
        self.batcher.start()
        outcome = await asyncio.to_thread(self.models.check)
        log.info("startup model check: %s", outcome.as_dict())
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="cnnloop-registry-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        await self.batcher.stop()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close, self.settings.log_drain_timeout_s)
        self._io_pool.shutdown(wait=True)
        if self.log is not None:
            self.log.close()

    @property
    def ready(self) -> bool:
        return self.models.current is not None and self.log is not None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await asyncio.to_thread(self.models.check)
            except Exception:  # the poller must outlive any one bad check
                log.exception("registry poll failed")

    async def reload(self) -> CheckOutcome:
        return await asyncio.to_thread(self.models.check, True)

    def _swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        self.metrics.model_loads.labels("ok").inc()
        self.metrics.serving(new.version, new.variant, new.providers,
                             (old.version, old.variant, ",".join(old.providers)) if old else None)
        self._labels_seen[new.version] = new.labels
        self._drift = LiveDrift(new.reference.class_prior, new.reference.mean_confidence, self.settings.drift_window)

    def serving_model(self) -> LoadedModel:
        """The model a request should use end to end (one snapshot), or NotReady."""
        model = self.models.current
        if model is None:
            raise NotReady(f"no model loaded yet: {self.models.last_error or 'still starting'}. "
                           f"Promote a version to '{self.settings.alias}' (`cnnloop registry promote VERSION`)")
        return model

    # predict ---------------------------------------------------------------------------------

    def _decode(self, index: int, image: Upload | PixelImage, policy: ResizePolicy) -> tuple[np.ndarray, str]:
        clock = self.cpu.clock()
        start = time.perf_counter()
        array = model_input(index, image, policy, self.settings.max_pixels)
        clock.lap("decode.image")
        sha = pixels_sha256(image.pixels) if isinstance(image, PixelImage) else hashlib.sha256(image.data).hexdigest()
        clock.lap("decode.sha256")
        self.metrics.preprocess_seconds.observe(time.perf_counter() - start)
        clock.lap("decode.metrics")
        return array, sha

    def _prepare(self, index: int, image: Upload | PixelImage, policy: ResizePolicy,
                 store: bool) -> tuple[np.ndarray, str, StoredImage | None]:
        """(model input, image sha256, what the store keeps or None when this image is not stored).
        A file is stored as sent. Pixels are stored as a lossless file the log writer's threads encode
        (6.6 ms of CPU a photo, more than the rest of the request): the request hands over the array."""
        array, sha = self._decode(index, image, policy)
        if not store:
            return array, sha, None
        return array, sha, functools.partial(lossless_image_bytes, image.pixels) if isinstance(image, PixelImage) else image.data

    async def predict(self, uploads: list[Upload]) -> dict:
        c = await self.classify(uploads)
        clock = self.cpu.clock()
        answers = [prediction_answer(r, c.labels, c.probabilities[i], c.top[i], None if c.sets is None else c.sets[i],
                                     c.abstained[i]) for i, r in enumerate(c.records)]
        body = predict_answer(c.model_version, answers, c.logged)
        clock.lap("loop.answer")
        return body

    async def classify(self, images: list[Upload | PixelImage], model: LoadedModel | None = None) -> Classification:
        """Decode, batch, log, count: the one prediction path of /predict and the OIP infer route."""
        model = model or self.serving_model()  # the snapshot this request uses end to end
        loop = asyncio.get_running_loop()
        store = [random.random() < self.settings.store_sample_rate for _ in images]
        prepared, raw, embs = await self.batcher.decode_and_run(
            model, [functools.partial(self._prepare, i, image, model.policy, s) for i, (image, s) in enumerate(zip(images, store))],
            self._decode_pool)
        # No await from here to the return: each lap is this request's own CPU on the event loop.
        clock = self.cpu.clock()
        served = calibrate_batch(raw, model.calibration, [sha for _, sha, _ in prepared],
                                 self.settings.abstain_below_confidence, self.settings.abstain_above_set_size)
        probs = served.probabilities
        now = time.time()
        top = top_k(probs, min(self.settings.top_k, len(model.labels)))
        clock.lap("loop.calibrate")
        kept, space = embeddings_to_log(embs, model.reference.project, self.settings.store_embeddings)
        clock.lap("loop.embedding")
        records = [
            build_prediction_record(
                prediction_id=new_record_id(now), created_at=now, model_version=model.version, labels=model.labels,
                probabilities=probs[i], top=top[i], image_sha256=sha, filename=image.filename,
                image_stored=stored is not None, embedding=None if kept is None else kept[i], embedding_space=space)
            for i, (image, (_, sha, stored)) in enumerate(zip(images, prepared))
        ]
        to_store = [(sha, stored) for _, sha, stored in prepared if stored is not None]
        clock.lap("loop.records")
        if not self.settings.log_predictions:
            logged = False
        elif self.writer.synchronous:
            logged = await loop.run_in_executor(self._io_pool, self.writer.submit, records, to_store)
            clock = self.cpu.clock()  # the await let other requests run on this thread
        else:
            logged = self.writer.submit(records, to_store)
        clock.lap("loop.log_submit")
        self.metrics.record_predictions([r.label for r in records], [r.confidence for r in records], model.version,
                                        int(served.abstained.sum()))
        clock.lap("loop.metrics")
        if self._drift is not None and self.models.current is model:
            self.metrics.record_drift(self._drift.observe(top[:, 0], probs[np.arange(len(top)), top[:, 0]]))
        clock.lap("loop.live_drift")
        return Classification(model.version, model.labels, records, probs, top, logged, served.sets, served.abstained)

    # feedback --------------------------------------------------------------------------------

    def _known_labels(self, version: str | None = None) -> list[str]:
        labels = list(self._labels_seen.get(version, [])) if version else []
        current = self.models.current
        return labels or (current.labels if current else [])

    def known_labels(self) -> list[str]:
        """Every class of every version served since start: what a feedback may name."""
        seen = {label for labels in self._labels_seen.values() for label in labels}
        return sorted(seen | set(self._known_labels()))

    def _check_label(self, label: str, version: str | None = None) -> None:
        known = self._known_labels(version)
        if label not in known:
            raise Unprocessable(f"unknown label '{label}'; known classes: {known}", code="unknown_label", known=known)

    async def feedback(self, fb: FeedbackIn) -> dict:
        record = await asyncio.to_thread(self.log.get_prediction, fb.prediction_id)
        if record is None:
            record = await self._await_recent_prediction(fb.prediction_id)
        if record is None:
            raise NotFound(f"no prediction with id '{fb.prediction_id}'; use a prediction_id a /predict answer gave",
                           code="unknown_prediction")
        self._check_label(fb.label, record.model_version)
        outcome = await asyncio.to_thread(self.log.record_feedback, fb.prediction_id, fb.label)
        if outcome is None:
            raise NotFound(f"no prediction with id '{fb.prediction_id}'", code="unknown_prediction")
        self.count_label(outcome.previous_label, outcome.label, outcome.predicted_label, outcome.changed)
        self.metrics.record_feedback(*self._feedback_counts)
        return {"prediction_id": outcome.prediction_id, "label": outcome.label,
                "predicted_label": outcome.predicted_label, "previous_label": outcome.previous_label,
                "changed": outcome.changed, "correct": outcome.label == outcome.predicted_label}

    def count_label(self, previous: str | None, label: str, predicted: str, changed: bool) -> None:
        """Keep the labeled/agreed counts behind cnnloop_feedback_accuracy as a label arrives or changes."""
        if changed:
            c = self._feedback_counts
            if previous is None:
                c[0] += 1
            else:
                c[1] -= previous == predicted
            c[1] += label == predicted

    async def _await_recent_prediction(self, prediction_id: str) -> PredictionRecord | None:
        """A prediction answered a moment ago may still be in a log queue: this replica's (commit it now)
        or another replica's behind a load balancer (wait for its batch, which closes within
        log_flush_interval_ms). Ids say when they were minted, so only recent ones wait."""
        if self.writer.pending(prediction_id):
            await asyncio.to_thread(self.writer.flush, _PENDING_FEEDBACK_WAIT_S)
            return await asyncio.to_thread(self.log.get_prediction, prediction_id)
        if not is_record_id(prediction_id):
            return None
        # min(): an id claiming a future time waits no longer than one minted now.
        deadline = min(record_time(prediction_id), time.time()) + self.settings.log_flush_interval_ms / 1000 + _OTHER_REPLICA_MARGIN_S
        while time.time() < deadline:
            await asyncio.sleep(0.05)
            record = await asyncio.to_thread(self.log.get_prediction, prediction_id)
            if record is not None:
                return record
        return None

    async def add_labeled_upload(self, upload: Upload, label: str) -> dict:
        model = self.serving_model()
        self._check_label(label)
        loop = asyncio.get_running_loop()
        _, sha = await loop.run_in_executor(self._decode_pool, self._decode, 0, upload, model.policy)

        def write() -> str:
            self.log.store_image(sha, upload.data)
            return self.log.add_labeled_upload(sha, label, upload.filename)

        upload_id = await loop.run_in_executor(self._io_pool, write)
        self.metrics.record_labeled_upload()
        return {"upload_id": upload_id, "label": label, "image_sha256": sha}

    # info ------------------------------------------------------------------------------------

    def info(self) -> dict:
        model = self.models.current
        s = self.settings
        return {
            "ready": self.ready,
            "model": model.describe() if model else None,
            "providers": model.providers if model else [],
            "registry": {"uri": s.registry, "alias": s.alias, "poll_interval_s": s.poll_interval_s,
                         "last_check": self.models.last_check, "last_error": self.models.last_error},
            "batching": {"max_batch_size": s.batch_max_size, "max_latency_ms": s.batch_max_latency_ms},
            "threads": self.threads,
            "log": None if self.log is None else {
                "database": self.log.describe(), "logging_predictions": s.log_predictions,
                "queue_size": s.log_queue_size, "queued": self.writer.queued if self.writer else 0},
            "drift": self._drift.scores().__dict__ if self._drift else None,
            "feedback": {"labeled_predictions": self._feedback_counts[0], "correct": self._feedback_counts[1]},
            **({"cpu": self.cpu.snapshot()} if self.cpu.enabled else {}),
            "settings": s.public_view(),
            "started_at": self.started_at,
        }
