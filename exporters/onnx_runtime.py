"""Run an exported graph or a bundle under ONNX Runtime: uint8 images -> (probabilities, embeddings).

torch-free on purpose: the service imports this with only onnxruntime(-gpu), numpy and pillow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.model_store.bundle import Bundle, read_bundle
from exporters.cpus import available_cpus
from exporters.errors import ExportError


def choose_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu on a GPU host), CPU always last."""
    available = ort.get_available_providers()
    wanted = (["CUDAExecutionProvider"] if prefer_gpu else []) + ["CPUExecutionProvider"]
    return [p for p in wanted if p in available]


class OnnxClassifier:
    """One ORT session over a graph with a uint8 NHWC `images` input and (probabilities, embedding) outputs."""

    def __init__(self, model_path: Path | str, prefer_gpu: bool = True, threads: int | None = None):
        """`threads`: ORT intra-op threads; None = the cores this process may use (exporters.cpus)."""
        self.path = Path(model_path)
        if not self.path.is_file():
            raise ExportError(f"ONNX model {self.path} does not exist; export a bundle first (`cnnloop export RUN_DIR`)")
        options = ort.SessionOptions()
        # Always explicit: ORT's own default pins a thread to every core of the node, past taskset and
        # a pod's CPU limit (see exporters/cpus.py).
        options.intra_op_num_threads = threads or available_cpus()
        # Quiet: ORT warns about unused initializers and CPU fallbacks of fp16 nodes on every load.
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=choose_providers(prefer_gpu))
        except Exception as e:
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {e}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses (a CUDA EP that failed to load is absent)."""
        return self.session.get_providers()

    @property
    def image_size(self) -> int:
        return int(self.input_shape[1])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A batch of uint8 HxWx3 images (N,H,W,3) -> float32 (probabilities N x C, embeddings N x D)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim == 3:
            images = images[None]
        probs, emb = self.session.run(self.output_names[:2], {self.input_name: images})
        return probs.astype(np.float32, copy=False), emb.astype(np.float32, copy=False)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Any number of images, run in batches so memory stays bounded."""
        if len(images) == 0:
            n_classes = self.session.get_outputs()[0].shape[1]
            return np.zeros((0, n_classes), np.float32), np.zeros((0, 0), np.float32)
        parts = [self.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])


def pick_variant(bundle: Bundle, prefer_gpu: bool = True) -> str:
    """fp16 on a GPU host, int8 on CPU, fp32 otherwise: the fastest variant the bundle kept."""
    kept = bundle.kept_variants
    on_gpu = prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers()
    for name in (["fp16", "fp32"] if on_gpu else ["int8", "fp32"]):
        if name in kept:
            return name
    return "fp32"


def load_bundle_model(bundle_dir: Path | str, variant: str | None = None, prefer_gpu: bool = True,
                      threads: int | None = None) -> tuple[OnnxClassifier, Bundle]:
    """Open a fetched bundle's graph (the named variant, or the best one for this host) and the bundle."""
    bundle = read_bundle(bundle_dir)
    path = bundle.variant_path(variant or pick_variant(bundle, prefer_gpu))
    return OnnxClassifier(path, prefer_gpu, threads), bundle
