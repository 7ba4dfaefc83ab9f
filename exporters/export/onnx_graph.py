"""torch -> ONNX: the trained classifier behind a uint8 image input, plus the parity check.

The exported graph takes what `preprocess.load_model_input` produces (uint8 RGB, NHWC, at the
model's crop size) and does cast -> /255 -> NCHW itself; the classifier normalises internally. So a
client of the bundle never re-implements normalisation: the classic train/serve skew bug has no
place to live.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporters.errors import ExportError

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "embedding")
INPUT_LAYOUT = "NHWC"
INPUT_DTYPE = "uint8"
# The export bar (check_parity): ORT and torch agree to 1e-4 on probabilities and always on top-1, or no bundle.
PARITY_TOLERANCE = 1e-4


class Uint8ImageClassifier(nn.Module):
    """uint8 NHWC images -> (class probabilities, pooled embedding), for export only."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(torch.float32).div(255.0).permute(0, 3, 1, 2)
        embedding = self.classifier.embed(x)
        logits = self.classifier.head(embedding)
        return torch.softmax(logits, dim=1), embedding


@dataclass(frozen=True)
class OnnxGraphInfo:
    path: str
    opset: int
    exporter: str
    input_name: str
    input_shape: list  # [None, H, W, 3]: None is the dynamic batch axis
    input_dtype: str
    input_layout: str
    output_names: list[str]
    embed_dim: int


def export_onnx(model: nn.Module, image_size: int, out_path: Path, opset: int = OPSET) -> OnnxGraphInfo:
    """Write a single-file ONNX graph of `model` behind a uint8 NHWC input with a dynamic batch axis."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = Uint8ImageClassifier(model).eval()
    # Batch 2, not 1: torch.export specialises size-1 dims, which would freeze the batch axis.
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8)
    exporter, dynamo_error = _export_dynamo(wrapper, example, out_path, opset)
    if exporter is None:
        exporter = _export_torchscript(wrapper, example, out_path, opset, dynamo_error)
    return verify_onnx_graph(out_path, image_size, exporter, opset)


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, out_path: Path, opset: int) -> tuple[str | None, str]:
    # dynamo=True works with torch 2.14 for efficientnet_lite0, resnet18, mobilenet_v3_large and
    # efficientnet_b0 (tried; parity <= 1.2e-7), so TorchScript is only a fallback. It is ~7x slower
    # than TorchScript (7.9 s vs 1.1 s for lite0), a price paid once per export. external_data=False keeps weights inside model.onnx (the default would
    # write a .onnx.data side file, and a bundle is meant to be a handful of self-contained files).
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        # The dynamo exporter prints progress to stdout; stdout belongs to the CLI's result (the version id).
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (example,), str(out_path), dynamo=True, external_data=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: batch}}, report=False, verbose=False,
            )
        return "torch.onnx dynamo", ""
    except Exception as e:  # any exporter failure: the TorchScript path below is the fallback
        return None, f"{type(e).__name__}: {str(e)[:500]}"


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, out_path: Path, opset: int, dynamo_error: str) -> str:
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (example,), str(out_path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
            )
    except Exception as e:
        raise ExportError(
            f"ONNX export failed with both exporters (dynamo: {dynamo_error}; TorchScript: "
            f"{type(e).__name__}: {str(e)[:500]}). The backbone may use an op ONNX opset {opset} lacks; "
            "try one of the registered backbones (efficientnet_lite0/1/2, resnet18, resnet50, mobilenet_v3_large)."
        ) from None
    return "torch.onnx TorchScript"


def verify_onnx_graph(path: Path, image_size: int, exporter: str = "unknown", min_opset: int = 17) -> OnnxGraphInfo:
    """Check the graph is one valid file with the io contract the service relies on."""
    path = Path(path)
    side_files = [p.name for p in path.parent.glob(path.name + ".*")]
    if side_files:
        raise ExportError(f"{path} was written with external data ({', '.join(side_files)}); the bundle needs one self-contained file")
    m = onnx.load(str(path))
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:
        raise ExportError(f"exported graph {path} fails onnx.checker: {e}") from None
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < min_opset:
        raise ExportError(f"exported graph {path} uses opset {opset}; at least {min_opset} is required")
    inp = m.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8 or shape[1:] != [image_size, image_size, 3] or shape[0] is not None:
        raise ExportError(f"exported graph {path} has input {inp.name} {shape} (elem type {inp.type.tensor_type.elem_type}); "
                          f"expected uint8 [batch, {image_size}, {image_size}, 3]")
    outs = [o.name for o in m.graph.output]
    emb_dims = m.graph.output[1].type.tensor_type.shape.dim
    return OnnxGraphInfo(
        path=path.name, opset=opset, exporter=exporter, input_name=inp.name, input_shape=shape,
        input_dtype=INPUT_DTYPE, input_layout=INPUT_LAYOUT, output_names=outs, embed_dim=int(emb_dims[1].dim_value),
    )


def torch_predict(model: nn.Module, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The reference answer for parity: the same uint8 images through the torch model, float32 on CPU."""
    wrapper = Uint8ImageClassifier(model).eval().cpu()
    probs, embs = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            p, e = wrapper(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
            probs.append(p.numpy())
            embs.append(e.numpy())
    return np.concatenate(probs).astype(np.float32), np.concatenate(embs).astype(np.float32)


def parity_figures(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far two sets of class probabilities are apart: max |dp| and top-1 agreement."""
    return {
        "n_images": int(len(reference)),
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if len(reference) else 0.0,
        "top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))) if len(reference) else 1.0,
    }


def check_parity(torch_probs: np.ndarray, onnx_probs: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Refuse an export whose ONNX graph does not compute what the torch model computes."""
    if len(torch_probs) == 0:
        raise ExportError("parity check needs validation images, and the run's val split is empty; retrain with a val split")
    figures = {**parity_figures(torch_probs, onnx_probs), "tolerance": tolerance}
    if figures["max_abs_diff"] > tolerance or figures["top1_agreement"] < 1.0:
        raise ExportError(
            f"ONNX parity check failed on {figures['n_images']} validation images: max |dp| = "
            f"{figures['max_abs_diff']:.3g} (allowed {tolerance:g}), top-1 agreement "
            f"{100 * figures['top1_agreement']:.1f}% (required 100%). The exported graph does not compute "
            "what the torch model does; check for train-mode layers or ops the exporter changed."
        )
    return figures
