"""The service room's one settings object: defaults < YAML file (CNNLOOP_CONFIG) < CNNLOOP_* env.

Loaded once when the BentoML service starts and passed down; no other service module reads the
environment. Every default works on a laptop with no cloud: a local registry and a local data dir.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from exporters.cpus import available_cpus
from exporters.locations import LogLocations
from exporters.preprocess import MAX_PIXELS
from exporters.settings_loader import load_settings
from service.errors import ConfigError

CONFIG_FILE_ENV = "CNNLOOP_CONFIG"


class ServiceSettings(LogLocations):
    """Every knob of the serving process (registry, data_dir, s3_endpoint_url come from StoreLocations)."""

    model_config = SettingsConfigDict(env_prefix="CNNLOOP_", extra="ignore", validate_assignment=True)

    alias: str = Field("production", description="registry alias the service serves and polls")
    bundle_cache_dir: Path | None = Field(None, description="where fetched bundles are unpacked; default DATA_DIR/bundles (local) or a temp dir (s3)")
    poll_interval_s: float = Field(30.0, ge=0.0, le=86_400, description="seconds between checks of the alias; 0 = never poll")

    # inference
    prefer_gpu: bool = Field(True, description="use CUDAExecutionProvider when onnxruntime-gpu sees a GPU")
    variant: Literal["auto", "fp32", "fp16", "int8"] = Field("auto", description="bundle graph variant; auto = fp16 on GPU, int8 on CPU when kept")
    ort_threads: int | None = Field(None, ge=1, le=256, description="ONNX Runtime intra-op threads; default 1 on CPU, the cores this process may use on GPU")
    inference_threads: int | None = Field(None, ge=1, le=256, description="inference calls at once; default one per available core on CPU, 2 on GPU")
    batch_max_size: int = Field(32, ge=1, le=1024, description="most images one inference call gets")
    batch_max_latency_ms: float = Field(5.0, ge=0.0, le=10_000, description="longest an image waits for its batch to fill")
    decode_threads: int = Field(0, ge=0, le=256, description="image decoding threads; 0 = one per available core (affinity and cgroup quota)")
    top_k: int = Field(3, ge=1, le=100)
    # The review queue (/review): which unlabeled predictions people see first, and for how long a
    # reviewer holds the items handed to them before they return to the queue.
    review_strategy: Literal["margin", "entropy", "novelty", "random"] = Field(
        "random", description="acquisition strategy ranking the review queue (abstained answers always first); random "
        "by measurement: no other strategy beat it per label spent (bench/label_budget.py)")
    review_lease_s: float = Field(300.0, ge=5.0, le=86_400, description="seconds a reviewer holds the items handed out")
    review_pool: int = Field(2000, ge=10, le=100_000, description="newest unlabeled predictions scored when the queue refills")
    review_refill_s: float = Field(10.0, ge=0.0, le=86_400, description="a reviewer's call refills the queue with traffic "
                                   "that arrived since, at most this often per replica (and whenever it runs low)")
    # Abstention: an answer says `abstained: true` (still with its top answers and set) when its
    # calibrated confidence is below this, or its prediction set is larger than that. Unset: the
    # bundle's own rule (`cnnloop train --target-accuracy` / `--max-set-size`); 0 turns a part off.
    abstain_below_confidence: float | None = Field(None, ge=0.0, le=1.0, description="abstain when the calibrated top-1 "
                                                   "probability is below this; default: the bundle's threshold (0 = never)")
    abstain_above_set_size: int | None = Field(None, ge=0, le=10_000, description="abstain when the prediction set has more "
                                               "classes than this; default: the bundle's limit (0 = never)")

    # request limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_files: int = Field(64, ge=1, le=10_000, description="most files one /predict request may carry")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description=f"larger images are refused (at most {MAX_PIXELS})")

    # prediction log
    store_sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="fraction of predicted images whose bytes are stored")
    store_embeddings: bool = Field(True, description="keep each prediction's embedding in its record (float16; projected on the bundle's PCA basis when it has one)")
    log_predictions: bool = Field(True, description="log every prediction (drift report, feedback, retraining need it); "
                                  "false: answers only, logged=false, no feedback on them")
    log_queue_size: int = Field(10_000, ge=0, le=1_000_000, description="prediction records held in memory until the log commits them: "
                                "a crash loses at most these, a full queue drops (counted); 0 = commit before answering (slower)")
    log_batch_size: int = Field(500, ge=1, le=10_000, description="most records one log commit writes")
    log_flush_interval_ms: float = Field(200.0, ge=1.0, le=60_000, description="longest a record waits for its log batch to fill")
    log_drain_timeout_s: float = Field(10.0, ge=0.0, le=600, description="how long a clean stop waits for the log queue to drain")

    # auth: unset = open. api_token guards /feedback*, /admin/*; predict_token guards /predict.
    api_token: SecretStr | None = None
    predict_token: SecretStr | None = None

    # tracing: BentoML's OpenTelemetry middleware builds a span's attributes for every request even when
    # tracing is off (sample rate 0): ~0.6 ms of CPU per request, measured on one core.
    trace_requests: bool = Field(False, description="let BentoML's OpenTelemetry middleware trace requests; "
                                 "turn on with BentoML's tracing config (exporter, sample_rate), else it costs CPU for nothing")

    # Off in production: a thread-CPU read at each stage boundary of the request path (GET /info
    # "cpu"; bench/request_cost.py). The per-thread totals it also shows cost nothing per request.
    cpu_stages: bool = Field(False, description="time each stage of a request in thread CPU and show the totals in GET /info")

    # live drift gauges
    drift_window: int = Field(500, ge=10, le=1_000_000, description="recent predictions the live drift scores cover")

    @field_validator("alias")
    @classmethod
    def _known_alias(cls, v: str) -> str:
        from exporters.model_store.registry import ALIASES

        if v not in ALIASES:
            raise ValueError(f"unknown alias; the registry has {', '.join(ALIASES)}")
        return v

    @field_validator("max_pixels")
    @classmethod
    def _pixels_within_decoder_limit(cls, v: int) -> int:
        if v > MAX_PIXELS:
            raise ValueError(f"{v} is over the decoder's hard limit {MAX_PIXELS} (exporters.preprocess.MAX_PIXELS)")
        return v

    @field_validator("api_token", "predict_token")
    @classmethod
    def _token_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value() == "":
            return None
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("tokens must be at least 16 characters (use e.g. `openssl rand -hex 24`)")
        return v

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or available_cpus()

    def resolved_inference_threads(self, gpu: bool) -> tuple[int, int]:
        """(ORT intra-op threads, concurrent inference calls).

        On CPU, single-threaded calls side by side (one per core) beat one call spread over all
        cores: no spinning thread pool fights the decode threads, and a preempted core delays one
        batch instead of every batch (measured on 2 shared cores: 61 vs 39 img/s at concurrency 32,
        and 31 ms vs 62 ms p50 at concurrency 1). On GPU, two calls overlap copies with compute."""
        if gpu:
            return self.ort_threads or available_cpus(), self.inference_threads or 2
        return self.ort_threads or 1, self.inference_threads or available_cpus()

    def resolved_lone_threads(self, gpu: bool) -> int | None:
        """ORT threads for a batch that runs alone (no other batch running or queued), or None for the
        usual session: on CPU with single-threaded calls and more than one core, a lone batch gets
        every core (a second session over the same graph). Off when ort_threads is set."""
        if gpu or self.ort_threads is not None:
            return None
        cores = available_cpus()
        return cores if cores > 1 else None

    def public_view(self) -> dict[str, Any]:
        """What GET /info may show: everything except secrets."""
        from exporters.prediction_log.sql import redact

        out = self.model_dump(mode="json", exclude={"api_token", "predict_token"})
        out["log_url"] = redact(self.log_url) if self.log_url else None
        out["auth"] = {"api_token": self.api_token is not None, "predict_token": self.predict_token is not None}
        return out


def load_service_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None,
                          environ: dict[str, str] | None = None) -> ServiceSettings:
    """Resolve the settings: defaults < YAML (`config_file` or $CNNLOOP_CONFIG) < CNNLOOP_* env < overrides."""
    environ = dict(os.environ if environ is None else environ)
    if config_file is None and environ.get(CONFIG_FILE_ENV):
        config_file = Path(environ[CONFIG_FILE_ENV])
    return load_settings(ServiceSettings, ConfigError, "service settings", config_file, overrides, environ,
                         file_fix=f"fix {CONFIG_FILE_ENV} or create the file")
