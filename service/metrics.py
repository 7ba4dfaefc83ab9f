"""cnnloop's Prometheus metrics, served on /metrics beside BentoML's own.

They go to prometheus_client's default registry, which BentoML runs in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR is set before the worker imports anything), so its /metrics endpoint
aggregates them across workers with no extra route. Tests pass their own CollectorRegistry.
Gauges say how to merge workers: the live, most recent value.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from exporters.prediction_log.records import FEEDBACK, LABELED_UPLOAD, REVIEW
from service.live_drift import DriftScores

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_GAUGE_MODE = "livemostrecent"


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry if registry is not None else REGISTRY
        self.registry = r
        self.predictions = Counter("cnnloop_predictions", "Images classified, by predicted class and model version",
                                   ["label", "model_version"], registry=r)
        self.abstentions = Counter("cnnloop_abstentions", "Answers that abstained (calibrated confidence under the "
                                   "threshold or prediction set over the size limit), by model version",
                                   ["model_version"], registry=r)
        self.confidence = Histogram("cnnloop_prediction_confidence", "Top-1 probability of each prediction (calibrated when the bundle is)",
                                    buckets=_CONFIDENCE_BUCKETS, registry=r)
        self.preprocess_seconds = Histogram("cnnloop_preprocess_seconds", "Decode + resize + crop time per image",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("cnnloop_inference_seconds", "ONNX Runtime time per batch",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cnnloop_inference_batch_size", "Images per ONNX Runtime call",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.model_info = Gauge("cnnloop_model_info", "1 for the model version being served, 0 for ones served before",
                                ["model_version", "variant", "providers"], multiprocess_mode=_GAUGE_MODE, registry=r)
        self.model_loads = Counter("cnnloop_model_loads", "Model load attempts by outcome (ok, failed)",
                                   ["outcome"], registry=r)
        self.rejected = Counter("cnnloop_rejected_requests", "Requests answered 4xx, by error code",
                                ["code"], registry=r)
        self.stored_inputs = Counter("cnnloop_stored_inputs", "Predicted images whose bytes were stored", registry=r)
        self.log_queue = Gauge("cnnloop_log_queue_records", "Prediction records answered but not yet committed to the log "
                               "(what a crash would lose)", multiprocess_mode="livesum", registry=r)
        self.log_written = Counter("cnnloop_log_written_records", "Prediction records committed to the log", registry=r)
        self.log_dropped = Counter("cnnloop_log_dropped_records", "Prediction records never logged, by reason "
                                   "(queue_full: the store is slower than the traffic; stopping: left at shutdown)",
                                   ["reason"], registry=r)
        self.log_write_failures = Counter("cnnloop_log_write_failures", "Failed log batch writes (each is retried)", registry=r)
        self.feedback = Counter("cnnloop_feedback", f"Labels received, by source: {FEEDBACK} (on a prediction, "
                                f"POST /feedback), {REVIEW} (the review queue) or {LABELED_UPLOAD} (a new image, POST /feedback/image)",
                                ["source"], registry=r)
        self.review_queue_depth = Gauge("cnnloop_review_queue_depth", "Review-queue items waiting for a reviewer "
                                        "(last seen by this replica)", multiprocess_mode="max", registry=r)
        self.review_expired_leases = Counter("cnnloop_review_expired_leases", "Review items handed out again because "
                                             "their reviewer's lease ran out", registry=r)
        self.label_delay = Histogram("cnnloop_label_delay_seconds", "Time from a prediction to its label from the review queue",
                                     buckets=(60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600), registry=r)
        self.feedback_accuracy = Gauge("cnnloop_feedback_accuracy",
                                       "Fraction of feedback-labeled predictions whose predicted label was right",
                                       multiprocess_mode=_GAUGE_MODE, registry=r)
        self.feedback_labeled = Gauge("cnnloop_feedback_labeled_predictions", "Predictions that have a feedback label",
                                      multiprocess_mode=_GAUGE_MODE, registry=r)
        self.drift_class_psi = Gauge("cnnloop_drift_class_psi",
                                     "PSI of the predicted-class distribution (rolling window) vs the reference class prior",
                                     multiprocess_mode=_GAUGE_MODE, registry=r)
        self.drift_confidence_shift = Gauge("cnnloop_drift_confidence_shift",
                                            "Rolling mean top-1 confidence minus the reference mean",
                                            multiprocess_mode=_GAUGE_MODE, registry=r)
        self.drift_window = Gauge("cnnloop_drift_window_predictions", "Predictions in the live drift window",
                                  multiprocess_mode=_GAUGE_MODE, registry=r)

    def record_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def record_predictions(self, labels: list[str], confidences: list[float], model_version: str,
                           abstained: int = 0) -> None:
        for label, conf in zip(labels, confidences):
            self.predictions.labels(label=label, model_version=model_version).inc()
            self.confidence.observe(conf)
        if abstained:
            self.abstentions.labels(model_version=model_version).inc(abstained)

    def record_drift(self, scores: DriftScores) -> None:
        self.drift_class_psi.set(scores.class_psi)
        self.drift_confidence_shift.set(scores.confidence_shift)
        self.drift_window.set(scores.window)

    def record_feedback(self, labeled: int, agreed: int) -> None:
        """One feedback label; `labeled` predictions have one now, `agreed` of them the predicted label."""
        self.feedback.labels(source=FEEDBACK).inc()
        self.feedback_labeled.set(labeled)
        if labeled:
            self.feedback_accuracy.set(agreed / labeled)

    def record_review_label(self, seconds_since_prediction: float) -> None:
        self.feedback.labels(source=REVIEW).inc()
        self.label_delay.observe(seconds_since_prediction)

    def record_labeled_upload(self) -> None:
        self.feedback.labels(source=LABELED_UPLOAD).inc()

    def serving(self, version: str, variant: str, providers: list[str], previous: tuple[str, str, str] | None) -> None:
        if previous is not None:
            self.model_info.labels(*previous).set(0)
        self.model_info.labels(model_version=version, variant=variant, providers=",".join(providers)).set(1)
        self.abstentions.labels(model_version=version)  # a served version shows 0 abstentions, not no series
