"""What the service does, without HTTP: predict, feedback, labeled inputs, info, reload, polling.

The BentoML class and the Starlette routes only validate, call one method here and shape the
answer; tests can drive a `ServingRuntime` directly in an event loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from exporters.onnx_runtime import choose_providers
from exporters.preprocess import MAX_PIXELS, ImageDecodeError, ResizePolicy, load_model_input
from exporters.prediction_log import PredictionLog, PredictionRecord, encode_embedding, new_record_id
from exporters.prediction_log import open_prediction_log as open_log_at
from exporters.registry import Registry
from service.batcher import AdaptiveBatcher
from service.errors import NotFound, NotReady, Unprocessable
from service.live_drift import LiveDrift
from service.metrics import ServiceMetrics
from service.model_session import CheckOutcome, LoadedModel, ModelSession
from service.request_validation import FeedbackIn, Upload, check_pixel_limit
from service.settings import ServiceSettings

log = logging.getLogger("cnnloop.service")


def open_registry(settings: ServiceSettings) -> Registry:
    return Registry.open(settings.registry, endpoint_url=settings.s3_endpoint_url)


def open_prediction_log(settings: ServiceSettings) -> PredictionLog:
    return open_log_at(settings.data_dir, settings.s3_endpoint_url)


class ServingRuntime:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics | None = None,
                 prediction_log: Callable[[ServiceSettings], PredictionLog] = open_prediction_log,
                 registry: Callable[[ServiceSettings], Registry] = open_registry):
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self._open_log = prediction_log
        self.log: PredictionLog | None = None
        gpu = settings.prefer_gpu and "CUDAExecutionProvider" in choose_providers(prefer_gpu=True)
        ort_threads, inference_threads = settings.resolved_inference_threads(gpu)
        self.models = ModelSession(settings, lambda: registry(settings), on_swap=self._swapped,
                                   on_failure=lambda version, error: self.metrics.model_loads.labels("failed").inc(),
                                   ort_threads=ort_threads)
        self.batcher = AdaptiveBatcher(settings.batch_max_size, settings.batch_max_latency_ms, self.metrics.record_batch,
                                       concurrent_batches=inference_threads)
        self.threads = {"ort_intra_op": ort_threads, "inference_calls": inference_threads,
                        "decode": settings.resolved_decode_threads()}
        self._decode_pool = ThreadPoolExecutor(settings.resolved_decode_threads(), thread_name_prefix="cnnloop-decode")
        self._io_pool = ThreadPoolExecutor(4, thread_name_prefix="cnnloop-log")
        self._drift: LiveDrift | None = None
        self._labels_seen: dict[str, list[str]] = {}
        self._feedback_counts = [0, 0]  # labeled predictions, of which predicted right
        self._poller: asyncio.Task | None = None
        self.started_at = time.time()

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.log = await asyncio.to_thread(self._open_log, self.settings)
        self._feedback_counts = list(await asyncio.to_thread(self.log.feedback_summary))
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

    def _model(self) -> LoadedModel:
        model = self.models.current
        if model is None:
            raise NotReady(f"no model loaded yet: {self.models.last_error or 'still starting'}. "
                           f"Promote a version to '{self.settings.alias}' (`cnnloop registry promote VERSION`)")
        return model

    # predict ---------------------------------------------------------------------------------

    def _decode(self, index: int, upload: Upload, policy: ResizePolicy) -> tuple[np.ndarray, str]:
        start = time.perf_counter()
        if self.settings.max_pixels < MAX_PIXELS:
            check_pixel_limit(upload, self.settings.max_pixels)
        try:
            array = load_model_input(upload.data, policy)
        except ImageDecodeError as e:
            raise Unprocessable(f"file {index} ('{upload.filename}'): {e}", code="bad_image",
                                index=index, filename=upload.filename) from None
        sha = hashlib.sha256(upload.data).hexdigest()
        self.metrics.preprocess_seconds.observe(time.perf_counter() - start)
        return array, sha

    async def predict(self, uploads: list[Upload]) -> dict:
        model = self._model()  # the snapshot this request uses end to end
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._decode, i, u, model.policy)
                                         for i, u in enumerate(uploads)))
        probs, embs = await self.batcher.run(model, np.stack([a for a, _ in decoded]))
        now = time.time()
        k = min(self.settings.top_k, len(model.labels))
        order = np.argsort(-probs, axis=1)[:, :k]
        projected = model.reference.project(embs) if self.settings.store_embeddings else None
        space = None if not self.settings.store_embeddings else ("pca" if projected is not None else "raw")
        kept = projected if projected is not None else embs
        records, answers, to_store = [], [], []
        for i, upload in enumerate(uploads):
            top = order[i]
            sha = decoded[i][1]
            stored = random.random() < self.settings.store_sample_rate
            if stored:
                to_store.append((sha, upload.data))
            record = PredictionRecord(
                prediction_id=new_record_id(now), created_at=now, model_version=model.version,
                label=model.labels[top[0]], confidence=float(probs[i, top[0]]),
                probabilities=[round(float(p), 6) for p in probs[i]], image_sha256=sha, image_stored=stored,
                filename=upload.filename, embedding=encode_embedding(kept[i]) if space else None, embedding_space=space)
            records.append(record)
            answers.append({
                "prediction_id": record.prediction_id, "filename": upload.filename, "label": record.label,
                "confidence": record.confidence, "model_version": model.version,
                "top_k": [{"label": model.labels[j], "probability": float(probs[i, j])} for j in top],
            })
        logged = await loop.run_in_executor(self._io_pool, self._write_log, records, to_store)
        self.metrics.record_predictions([r.label for r in records], [r.confidence for r in records], model.version)
        if self._drift is not None and self.models.current is model:
            self.metrics.record_drift(self._drift.observe(order[:, 0], probs[np.arange(len(order)), order[:, 0]]))
        if not logged:
            for a in answers:
                a["logged"] = False
        return {"model_version": model.version, "predictions": answers}

    def _write_log(self, records: list[PredictionRecord], images: list[tuple[str, bytes]]) -> bool:
        # A failing log must not fail predictions already made: count it, answer logged=false.
        try:
            for sha, data in images:
                self.log.store_image(sha, data)
            self.log.add_predictions(records)
        except Exception:
            log.exception("prediction log write failed (%d records)", len(records))
            self.metrics.rejected.labels("log_write_failed").inc()
            return False
        self.metrics.stored_inputs.inc(len(images))
        return True

    # feedback --------------------------------------------------------------------------------

    def _known_labels(self, version: str | None = None) -> list[str]:
        labels = list(self._labels_seen.get(version, [])) if version else []
        current = self.models.current
        return labels or (current.labels if current else [])

    def _check_label(self, label: str, version: str | None = None) -> None:
        known = self._known_labels(version)
        if label not in known:
            raise Unprocessable(f"unknown label '{label}'; known classes: {known}", code="unknown_label", known=known)

    async def feedback(self, fb: FeedbackIn) -> dict:
        record = await asyncio.to_thread(self.log.get_prediction, fb.prediction_id)
        if record is None:
            raise NotFound(f"no prediction with id '{fb.prediction_id}'; use a prediction_id a /predict answer gave",
                           code="unknown_prediction")
        self._check_label(fb.label, record.model_version)
        outcome = await asyncio.to_thread(self.log.record_feedback, fb.prediction_id, fb.label)
        if outcome is None:
            raise NotFound(f"no prediction with id '{fb.prediction_id}'", code="unknown_prediction")
        if outcome.changed:
            c = self._feedback_counts
            if outcome.previous_label is None:
                c[0] += 1
            else:
                c[1] -= outcome.previous_label == outcome.predicted_label
            c[1] += outcome.label == outcome.predicted_label
        self.metrics.record_feedback("prediction", *self._feedback_counts)
        return {"prediction_id": outcome.prediction_id, "label": outcome.label,
                "predicted_label": outcome.predicted_label, "previous_label": outcome.previous_label,
                "changed": outcome.changed, "correct": outcome.label == outcome.predicted_label}

    async def add_labeled_image(self, upload: Upload, label: str) -> dict:
        model = self._model()
        self._check_label(label)
        loop = asyncio.get_running_loop()
        _, sha = await loop.run_in_executor(self._decode_pool, self._decode, 0, upload, model.policy)

        def write() -> str:
            self.log.store_image(sha, upload.data)
            return self.log.add_labeled_input(sha, label, upload.filename)

        input_id = await loop.run_in_executor(self._io_pool, write)
        self.metrics.feedback.labels(source="direct").inc()
        return {"input_id": input_id, "label": label, "image_sha256": sha}

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
            "drift": self._drift.scores().__dict__ if self._drift else None,
            "feedback": {"labeled_predictions": self._feedback_counts[0], "correct": self._feedback_counts[1]},
            "settings": s.public_view(),
            "started_at": self.started_at,
        }
