"""The model being served: a fetched bundle + its ONNX Runtime session, and the atomic swap.

`ModelSession.current` is one attribute read; a request snapshots it once and keeps that object
for decode (resize policy) and inference, so a swap never mixes two models inside one request and
in-flight requests finish on the old session (which lives until its last reference drops).
A new version is fetched (checksums verified by the registry), opened, checked against its own
metadata and warmed up *before* the swap; any failure is logged and counted and the old model
keeps serving.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exporters.calibration import Calibration
from exporters.model_store.bundle import Bundle, read_reference_stats
from exporters.onnx_runtime import OnnxClassifier, load_bundle_model
from exporters.preprocess import ResizePolicy
from exporters.reference_stats import project
from service.settings import ServiceSettings

log = logging.getLogger("cnnloop.service")


@dataclass(frozen=True)
class Reference:
    """What live traffic is compared with: the bundle's class prior, mean confidence, PCA basis."""

    class_prior: np.ndarray
    mean_confidence: float | None
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    embeddings_sample: np.ndarray | None = None  # validation embeddings in the PCA space: the review queue's novelty

    def project(self, embeddings: np.ndarray) -> np.ndarray | None:
        if self.pca_components is None:
            return None
        return project(embeddings, self.pca_mean, self.pca_components)


@dataclass
class LoadedModel:
    version: str
    classifier: OnnxClassifier
    bundle: Bundle
    labels: list[str]
    policy: ResizePolicy
    variant: str
    reference: Reference
    calibration: Calibration | None = None  # None: a bundle exported before calibration, served raw
    # The same graph with one ORT thread per core, for a batch that has the machine to itself (see run_alone).
    lone_classifier: OnnxClassifier | None = None
    fetch_dir: Path | None = None  # the cache folder this model was fetched into; removed when it is replaced
    loaded_at: float = field(default_factory=time.time)

    @property
    def providers(self) -> list[str]:
        return self.classifier.providers

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.classifier.run(images)

    def run_alone(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch with no other batch running or waiting: spread over every core. Under load the
        single-threaded calls side by side win (service.settings.resolved_inference_threads); a lone
        request on 2 cores waits 3.2 ms for the int8 Lite0 instead of 5.1 ms (bench/serve_wrk.py, c=1)."""
        return (self.lone_classifier or self.classifier).run(images)

    def describe(self) -> dict:
        return {
            "version": self.version,
            "variant": self.variant,
            "providers": self.providers,
            "labels": self.labels,
            "input": {"size": self.policy.crop_size, "resize_size": self.policy.resize_size,
                      "layout": self.bundle.input.get("layout", "NHWC"), "dtype": "uint8"},
            "loaded_at": self.loaded_at,
            "backbone": self.bundle.backbone,
            "created_at": self.bundle.created_at,
            "calibration": describe_calibration(self.calibration),
        }


def describe_calibration(calibration: Calibration | None) -> dict:
    if calibration is None:
        return {"calibrated": False, "why": "this bundle carries no calibration (exported before cnnloop calibrated): "
                "probabilities are the model's raw softmax and answers carry no prediction set; re-export it to calibrate"}
    return {"calibrated": True, **calibration.to_json()}


@dataclass(frozen=True)
class CheckOutcome:
    """What one look at the alias did: 'unchanged', 'swapped', 'failed' or 'no_model'."""

    outcome: str
    version: str | None
    previous: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def read_reference(bundle: Bundle) -> Reference:
    """The bundle's reference (exporters.model_store.bundle); a uniform prior when it has none."""
    ref = read_reference_stats(bundle)
    n_classes = len(bundle.labels)
    prior = ref.class_prior
    if prior is None or len(prior) != n_classes:
        prior = np.ones(n_classes)
    probs = ref.probs_sample
    conf = float(probs.max(1).mean()) if probs is not None and len(probs) else None
    return Reference(prior / prior.sum(), conf, ref.pca_mean, ref.pca_components, ref.embeddings_pca_sample)


def open_bundle(bundle_dir: Path, version: str, settings: ServiceSettings, ort_threads: int | None = None,
                lone_threads: int | None = None) -> LoadedModel:
    """Open a fetched bundle's graph, check it answers as its metadata says, and warm it up.
    `lone_threads` (settings.resolved_lone_threads): also a session with that many threads, for lone batches."""
    variant = None if settings.variant == "auto" else settings.variant
    classifier, bundle = load_bundle_model(bundle_dir, variant=variant, prefer_gpu=settings.prefer_gpu,
                                           threads=ort_threads)
    lone = OnnxClassifier(classifier.path, settings.prefer_gpu, lone_threads) if lone_threads else None
    labels = list(bundle.labels)
    policy = bundle.policy
    if policy.crop_size != classifier.image_size:
        raise ValueError(f"bundle {version}: metadata crop size {policy.crop_size} != graph input {classifier.image_size}")
    # Warm-up: the first calls allocate arenas and pick kernels, at the batch sizes traffic will use.
    for batch in sorted({1, settings.batch_max_size}):
        probs, _ = classifier.run(np.zeros((batch, policy.crop_size, policy.crop_size, 3), np.uint8))
    if lone is not None:  # lone batches are mostly single images
        lone.run(np.zeros((1, policy.crop_size, policy.crop_size, 3), np.uint8))
    if probs.shape[1] != len(labels):
        raise ValueError(f"bundle {version}: graph gives {probs.shape[1]} probabilities but metadata lists {len(labels)} labels")
    reference = read_reference(bundle)
    chosen = variant or next((k for k, v in bundle.variants.items() if v.file == classifier.path.name), "fp32")
    return LoadedModel(version=version, classifier=classifier, bundle=bundle, labels=labels, policy=policy,
                       variant=chosen, reference=reference, calibration=Calibration.from_json(bundle.calibration),
                       lone_classifier=lone)


class ModelSession:
    """Holds the served model; `check()` follows the registry alias and swaps atomically."""

    def __init__(self, settings: ServiceSettings, open_registry: Callable[[], object],
                 on_swap: Callable[[LoadedModel, LoadedModel | None], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None, ort_threads: int | None = None,
                 lone_threads: int | None = None):
        self.settings = settings
        self.ort_threads = ort_threads
        self.lone_threads = lone_threads
        self._open_registry = open_registry
        self._registry = None
        self._on_swap = on_swap or (lambda new, old: None)
        self._on_failure = on_failure or (lambda version, error: None)
        self.current: LoadedModel | None = None
        self._check_lock = threading.Lock()
        self._failed: dict[str, str] = {}  # version -> why; not retried by polling, only by a forced check
        self.last_check: float | None = None
        self.last_error: str | None = None
        if settings.bundle_cache_dir is not None:
            self.cache_dir = Path(settings.bundle_cache_dir)
        elif settings.data_is_s3:
            self.cache_dir = Path(tempfile.mkdtemp(prefix="cnnloop-bundles-"))
        else:
            self.cache_dir = Path(settings.data_dir) / "bundles"

    @property
    def registry(self):
        if self._registry is None:
            self._registry = self._open_registry()
        return self._registry

    def check(self, force: bool = False) -> CheckOutcome:
        """Resolve the alias; load, verify, warm up and swap in a new version. Blocking: run in a thread."""
        with self._check_lock:
            self.last_check = time.time()
            previous = self.current.version if self.current else None
            try:
                version = self.registry.resolve(self.settings.alias)
            except Exception as e:
                return self._fail(None, previous, f"cannot read alias '{self.settings.alias}' from {self.settings.registry}: {e}")
            if version is None:
                return CheckOutcome("no_model", None, previous, f"the registry has no '{self.settings.alias}' alias yet")
            if version == previous:
                return CheckOutcome("unchanged", version, previous)
            if version in self._failed and not force:
                return CheckOutcome("failed", version, previous, self._failed[version])
            try:
                model = self._load(version)
            except Exception as e:
                self._failed[version] = f"{type(e).__name__}: {e}"
                return self._fail(version, previous, self._failed[version])
            old = self.current
            self.current = model  # the swap: one reference assignment
            self._failed.pop(version, None)
            self.last_error = None
            log.info("serving model %s (%s, providers %s), was %s", version, model.variant, model.providers, previous)
            self._on_swap(model, old)
            if old is not None and old.fetch_dir is not None:
                shutil.rmtree(old.fetch_dir, ignore_errors=True)  # the session keeps its graph in memory
            return CheckOutcome("swapped", version, previous)

    def _fail(self, version: str | None, previous: str | None, error: str) -> CheckOutcome:
        self.last_error = error
        log.error("model %s not loaded, %s keeps serving: %s", version, previous or "nothing", error)
        self._on_failure(version or "", error)
        return CheckOutcome("failed", version, previous, error)

    def _load(self, version: str) -> LoadedModel:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=self.cache_dir))
        try:
            model = open_bundle(Path(self.registry.fetch(version, dest)), version, self.settings, self.ort_threads,
                                self.lone_threads)
            model.fetch_dir = dest
            return model
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
