"""How a trained model becomes a bundle folder: ONNX graphs, variants, reference statistics, metadata.

The files and their names are `exporters.model_store.bundle`. The torch model comes in as an argument (exporters
never import training/); `training.run.publish` adds the torch weights and splits and publishes.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from exporters.calibration import Calibration
from exporters.model_store.bundle import FORMAT_VERSION, MODEL_FILE, REFERENCE_FILE
from exporters.errors import ExportError
from exporters.export.onnx_graph import PARITY_TOLERANCE, check_parity, export_onnx, torch_predict
from exporters.onnx_runtime import OnnxClassifier
from exporters.preprocess import ResizePolicy
from exporters.reference_stats import MAX_SAMPLE, reference_statistics, save_reference
from exporters.export.variants import DEFAULT_MAX_ACCURACY_DROP, VARIANTS, accuracy, build_and_judge

# int8 MinMax calibration of efficientnet_lite0 on 100 images takes ~6 s on 2 cores; more images barely
# move the ranges.
INT8_CALIBRATION_IMAGES = 100
# Training images export_bundle uses at most (calibration, PCA fit): callers need decode no more.
TRAIN_SAMPLE = max(INT8_CALIBRATION_IMAGES, MAX_SAMPLE)


@dataclass
class LabeledImages:
    images: np.ndarray  # uint8 N x H x W x 3, each from preprocess.load_model_input
    labels: np.ndarray  # int64 class indices into the bundle's labels

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ExportError(f"images must be uint8 N x H x W x 3 with one label each; got {self.images.dtype} "
                              f"{self.images.shape} and {len(self.labels)} labels")


@dataclass
class RunDescription:
    """What the bundle records about the training run it came from."""

    backbone: dict
    training_config: dict
    metrics: dict  # the run's metrics.json; only the val/test summaries are kept
    dataset_fingerprint: dict
    train_class_counts: list[int]  # of the whole train split: the drift report's class prior
    source_run: str


def dataset_fingerprint(paths: Sequence[Path | str]) -> dict:
    """sha256 over sorted (path relative to the files' common folder, file sha256): moving the
    dataset keeps the fingerprint, changing, adding or removing any image changes it."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        raise ExportError("the run's train split lists no files; cannot fingerprint the training data")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ExportError(f"{len(missing)} training image(s) listed in splits.json are missing (e.g. {missing[0]}); "
                          "the bundle must fingerprint the data it was trained on: restore them or retrain")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    entries = sorted((p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths)
    digest = hashlib.sha256()
    for rel, sha in entries:
        digest.update(f"{rel}\0{sha}\n".encode())
    return {"sha256": digest.hexdigest(), "n_files": len(entries), "algorithm": "sha256 of sorted 'relpath\\0sha256\\n' lines"}


def metrics_summary(metrics: dict) -> dict:
    """val/test scores and the early-stopping facts; the per-epoch history stays in the run dir."""
    keep = ("val", "test", "best_epoch", "monitor", "class_counts", "device", "calibration", "prediction_sets")
    summary = {k: metrics[k] for k in keep if k in metrics}
    if "calibration_test" in metrics:  # the scores, not the reliability bins the run's PNG draws
        summary["calibration_test"] = {k: metrics["calibration_test"][k] for k in ("before", "after")}
    if "risk_coverage" in metrics:
        summary["risk_coverage"] = {"at_coverage": metrics["risk_coverage"]["at_coverage"]}
    return summary


def spread_sample(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n): deterministic and covering every class in sorted splits."""
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(int)) if n else np.zeros(0, int)


def _check_batch_sizes(classifier: OnnxClassifier, images: np.ndarray, n_classes: int) -> None:
    """The batch axis must really be dynamic: a graph traced with a fixed batch fails here, not in the service."""
    for n in (1, 5):
        batch = images[np.arange(n) % len(images)]
        probs, emb = classifier.run(batch)
        if probs.shape != (n, n_classes) or emb.shape[0] != n:
            raise ExportError(f"exported graph answers a batch of {n} with shapes {probs.shape}, {emb.shape}; "
                              f"expected ({n}, {n_classes}) probabilities and {n} embeddings")


def export_bundle(model, classes: list[str], policy: ResizePolicy, run: RunDescription, val: LabeledImages,
                  train_images: np.ndarray, out_dir: Path, variants: Sequence[str] = VARIANTS,
                  max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP, parent_version: str | None = None,
                  calibration: Calibration | None = None, log: Callable[[str], None] = lambda _: None) -> tuple[Path, dict]:
    """Export `model` (a torch Classifier) into `out_dir` and return (out_dir, metadata for Registry.publish).

    `val` are the run's validation images (parity, variant accuracy, reference statistics);
    `train_images` up to TRAIN_SAMPLE uint8 training images (int8 calibration, PCA fit when val is small).

    `calibration` (fitted by training on held-out images) is what the service applies to the graph's
    probabilities; the reference statistics are computed on the calibrated probabilities, as served.
    Fails with ExportError when the ONNX graph disagrees with torch on the validation images."""
    import onnx
    import onnxruntime
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(val.images) == 0:
        raise ExportError("the run has no validation images; the parity check and the variant figures need them (retrain with a val split)")
    if val.images.shape[1:3] != (policy.crop_size, policy.crop_size):
        raise ExportError(f"validation images are {val.images.shape[1:3]}, the model expects {policy.crop_size}; "
                          "preprocess them with exporters.preprocess.load_model_input and the run's policy")

    start = time.perf_counter()
    model = model.eval().cpu()
    graph = export_onnx(model, policy.crop_size, out_dir / MODEL_FILE)
    log(f"exported {MODEL_FILE} with {graph.exporter}, opset {graph.opset} ({time.perf_counter() - start:.1f}s)")

    fp32 = OnnxClassifier(out_dir / MODEL_FILE, prefer_gpu=False)
    _check_batch_sizes(fp32, val.images, len(classes))
    ort_probs, ort_emb = fp32.predict(val.images)
    torch_probs, torch_emb = torch_predict(model, val.images)
    parity = check_parity(torch_probs, ort_probs, PARITY_TOLERANCE)
    parity["embedding_max_abs_diff"] = float(np.max(np.abs(torch_emb - ort_emb)))
    if calibration is not None:
        # The service serves calibration.apply(graph output): held to the same bar against torch's.
        calibrated = check_parity(calibration.apply(torch_probs), calibration.apply(ort_probs), PARITY_TOLERANCE)
        parity["calibrated_max_abs_diff"] = calibrated["max_abs_diff"]
    log(f"parity on {parity['n_images']} val images: max |dp| {parity['max_abs_diff']:.2e}, top-1 agreement {100 * parity['top1_agreement']:.0f}%")

    fp32_acc = accuracy(ort_probs, val.labels)
    variant_entries = {"fp32": {
        "file": MODEL_FILE, "refused": False, "accuracy": fp32_acc, "accuracy_delta_points": 0.0,
        "parity_vs_torch": parity, "size_bytes": (out_dir / MODEL_FILE).stat().st_size,
        "measured_with": "onnxruntime CPUExecutionProvider",
    }}
    int8_calibration = train_images[spread_sample(len(train_images), INT8_CALIBRATION_IMAGES)]
    for name in variants:
        entry = build_and_judge(name, out_dir / MODEL_FILE, out_dir, int8_calibration, val.images, val.labels, ort_probs, max_accuracy_drop)
        variant_entries[name] = entry
        verdict = f"REFUSED: {entry['refusal_reason']}" if entry["refused"] else "kept"
        log(f"{name}: val accuracy {100 * entry['accuracy']:.2f}% ({entry['accuracy_delta_points']:+.2f} points vs fp32), {verdict}")

    # The PCA basis is fitted on training embeddings, never on the validation sample it projects:
    # fitted on its own points, a 32-dim basis in 1280 dims inflates their spread and MMD then
    # flags every clean window (measured on hymenoptera: 85-100% false alarms; 0-2% held out).
    extra = fp32.predict(train_images[spread_sample(len(train_images), MAX_SAMPLE)])[1] if len(train_images) else None
    served_probs = ort_probs if calibration is None else calibration.apply(ort_probs)
    reference, arrays = reference_statistics(served_probs, ort_emb, val.labels, run.train_class_counts, extra_embeddings=extra)
    reference["file"] = REFERENCE_FILE
    save_reference(out_dir / REFERENCE_FILE, arrays)

    metadata = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parent_version": parent_version,
        "labels": list(classes),
        "input": {"name": graph.input_name, "dtype": graph.input_dtype, "layout": graph.input_layout,
                  "shape": graph.input_shape, "color": "RGB", "value_range": [0, 255]},
        "outputs": {"probabilities": graph.output_names[0], "embedding": graph.output_names[1], "embed_dim": graph.embed_dim},
        "preprocess": {**policy.as_dict(), "function": "exporters.preprocess.load_model_input"},
        "backbone": run.backbone,
        "metrics": metrics_summary(run.metrics),
        "training": {"config": run.training_config, "source_run": run.source_run},
        "dataset_fingerprint": run.dataset_fingerprint,
        "onnx": {"opset": graph.opset, "exporter": graph.exporter, "onnx": onnx.__version__,
                 "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "max_accuracy_drop_points": max_accuracy_drop,
        "variants": variant_entries,
        "refused_variants": [n for n, v in variant_entries.items() if v["refused"]],
        "reference": reference,
        "calibration": None if calibration is None else calibration.to_json(),
        "export_seconds": round(time.perf_counter() - start, 1),
    }
    return out_dir, metadata
