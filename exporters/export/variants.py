"""Smaller/faster variants of the fp32 graph (fp16 for GPU, int8 for CPU), each kept only if it stays accurate.

Every variant is measured on the same validation images under ONNX Runtime CPU and refused when it
loses more than the allowed accuracy margin: a quick model that is wrong is not a deployment option.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from exporters.model_store.bundle import variant_file
from exporters.errors import ExportError
from exporters.export.onnx_graph import INPUT_NAME, parity_figures
from exporters.onnx_runtime import OnnxClassifier

VARIANTS = ("fp16", "int8")
DEFAULT_MAX_ACCURACY_DROP = 1.0  # percentage points of validation accuracy
CALIBRATION_BATCH = 8


def parse_variants(text: str) -> list[str]:
    names = [v.strip().lower() for v in text.split(",") if v.strip() and v.strip().lower() != "none"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ExportError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)} (comma-separated), or 'none'")
    return list(dict.fromkeys(names))


def build_fp16(fp32_path: Path, out_path: Path) -> Path:
    """fp16 weights and activations; the uint8 input and float32 outputs stay as they are."""
    # onnxruntime's own converter, not onnxconverter-common's: the latter (1.16) leaves the
    # uint8->float Cast at the graph input typed float while relabelling its output float16, and
    # ORT refuses to load the result. keep_io_types keeps the service's io contract unchanged.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path


class _ImageBatches:
    """onnxruntime's CalibrationDataReader over uint8 images (get_next -> feed dict, None at the end).

    Duck-typed: CalibrationDataReader's __subclasshook__ accepts any class with get_next."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self._batches = iter([{INPUT_NAME: np.ascontiguousarray(images[i : i + batch_size])}
                              for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def _head_nodes(model_path: Path) -> list[str]:
    """The classifier head (Gemm/MatMul) and Softmax stay float. Quantized, the probabilities come out
    in steps of 1/255 (many exactly 0): clients get tied top-k, and the drift report's KS tests see
    the quantization grid itself as a shift (p ~ 1e-5 on clean traffic vs the fp32 reference)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Softmax":
            keep.append(node.name)
            head = producers.get(node.input[0])
            while head is not None and head.op_type in ("Gemm", "MatMul", "Add"):
                keep.append(head.name)
                head = producers.get(head.input[0]) if head.op_type == "Add" else None
    return keep


def build_int8(fp32_path: Path, out_path: Path, calibration_images: np.ndarray) -> Path:
    """Static int8 (QDQ, per-channel weights) calibrated with MinMax on training images."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise ExportError("int8 calibration needs training images and none were given; drop int8 from --variants or fix the run's train split")
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    try:
        # Shape inference + graph fusions first: quantize_static then sees fused Conv+BN and folds more.
        quant_pre_process(str(fp32_path), str(prepared))
        # uint8 activations with int8 weights (U8S8) is ORT's fast path on x86: on the 2-core EPYC
        # dev box (AVX512-VNNI) it ran efficientnet_lite0 at 118 img/s vs 70 for fp32, while
        # int8 activations ran no faster than fp32 (72). Don't set CalibMaxIntermediateOutputs:
        # in ORT 1.32 MinMax drops the collected ranges when it flushes, failing with "No data is
        # collected"; MinMax keeps only per-tensor min/max outputs, so memory stays small anyway.
        quantize_static(
            str(prepared), str(out_path), _ImageBatches(calibration_images),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=_head_nodes(prepared),
        )
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"int8 quantization failed: {type(e).__name__}: {e}; export without it (--variants fp16)") from None
    finally:
        prepared.unlink(missing_ok=True)
    return out_path


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels)) if len(labels) else float("nan")


def refusal_reason(name: str, fp32_accuracy: float, variant_accuracy: float, max_drop: float) -> str | None:
    """Why a variant is refused (its accuracy drop in points exceeds max_drop), or None if kept."""
    drop = 100.0 * (fp32_accuracy - variant_accuracy)
    if drop > max_drop:
        return (f"{name} loses {drop:.2f} points of validation accuracy ({100 * variant_accuracy:.2f}% vs fp32 "
                f"{100 * fp32_accuracy:.2f}%), more than the allowed {max_drop:g}")
    return None


def build_variant(name: str, fp32_path: Path, out_dir: Path, calibration_images: np.ndarray) -> Path:
    out_path = Path(out_dir) / variant_file(name)
    if name == "fp16":
        return build_fp16(fp32_path, out_path)
    if name == "int8":
        return build_int8(fp32_path, out_path, calibration_images)
    raise ExportError(f"unknown variant {name}; choose from {', '.join(VARIANTS)}")


def build_and_judge(name: str, fp32_path: Path, out_dir: Path, calibration_images: np.ndarray, val_images: np.ndarray,
                    val_labels: np.ndarray, fp32_probs: np.ndarray, max_drop: float) -> dict:
    """Build one variant, measure it on validation (ORT CPU), and delete it again if it is refused."""
    start = time.perf_counter()
    path = build_variant(name, fp32_path, out_dir, calibration_images)
    # CPU on purpose: the figures must be comparable across hosts; fp16 runs (slowly) on CPU too.
    probs, _ = OnnxClassifier(path, prefer_gpu=False).predict(val_images)
    fp32_acc, acc = accuracy(fp32_probs, val_labels), accuracy(probs, val_labels)
    reason = refusal_reason(name, fp32_acc, acc, max_drop)
    entry = {
        "file": None if reason else path.name,
        "refused": reason is not None,
        "refusal_reason": reason,
        "accuracy": acc,
        "accuracy_delta_points": 100.0 * (acc - fp32_acc),
        "max_accuracy_drop_points": max_drop,
        "vs_fp32": parity_figures(fp32_probs, probs),
        "size_bytes": path.stat().st_size,
        "build_seconds": round(time.perf_counter() - start, 2),
        "measured_with": "onnxruntime CPUExecutionProvider",
    }
    if reason:
        path.unlink()
    return entry
