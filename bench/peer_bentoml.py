"""The fair peer for bench/serve_wrk.py: an ONNX image classifier written as BentoML's docs teach it.

One `@bentoml.service` class, an ONNX Runtime InferenceSession, a `PIL.Image.Image` input and
`@bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=1000)`: the adaptive batching
settings of BentoML's "Adaptive batching" guide (docs.bentoml.com/en/latest/get-started/adaptive-batching.html,
its SentenceEmbedding example) and the image input of "Define input and output types"
(build-with-bentoml/iotypes.html). Everything that is not BentoML is cnnloop's, so the two services
differ only in how they serve:
  - the graph: the bundle's own .onnx, the variant cnnloop picks for this host (int8 on CPU);
  - the model input: exporters.preprocess on the PIL image BentoML hands over, bit-identical to
    cnnloop's `load_model_input` on the same bytes (`model_input`; bench/serve_wrk.py checks it);
  - ORT threads: one per core of the process's affinity (exporters.cpus), workers=1.
No prediction log, no metrics beyond BentoML's own, BentoML's default tracing. The answer is a list
with one {label, confidence} per image (confidence: the graph's softmax probability of the label).

The request is cnnloop's: a multipart POST /predict with the JPEG under the field `images` (the
batchable parameter is `images: list[Image]`; BentoML gives a list field every file sent under its
name, so one file is a batch of one), as bench/wrk_multipart.lua and `curl -F images=@x.jpg` send it.

    CNNLOOP_PEER_BUNDLE=/path/to/fetched/bundle bentoml serve bench.peer_bentoml:PeerClassifier

CNNLOOP_PEER_BUNDLE is a fetched bundle directory (`Registry.fetch`): its bundle.json names the
.onnx files, the labels and the crop/resize sizes. CNNLOOP_PEER_VARIANT (optional) forces a variant.
"""
from __future__ import annotations

import os

import bentoml
import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from exporters.preprocess import ResizePolicy, load_array_input


def model_input(image: Image.Image, policy: ResizePolicy) -> np.ndarray:
    """A PIL image as BentoML opens it (header read, pixels not yet decoded) -> the model's uint8 HWC input,
    the same array cnnloop's `load_model_input` makes from the file's bytes.

    The draft (libjpeg's 1/2..1/8 scaled decode) and the EXIF turn are cnnloop's decode choices, made
    here through PIL's public calls; the resize and crop are exporters.preprocess's own."""
    if isinstance(image, JpegImageFile):
        image.draft("RGB", (policy.resize_size, policy.resize_size))
    rgb = image.convert("RGB")
    # Turning the decoded photo before the resize gives the same pixels as cnnloop's turn after it:
    # its two-pass resize is there so that the two orders agree.
    ImageOps.exif_transpose(rgb, in_place=True)
    return load_array_input(np.asarray(rgb), policy)


@bentoml.service(workers=1)
class PeerClassifier:
    def __init__(self) -> None:
        import onnxruntime as ort

        from exporters.cpus import available_cpus
        from exporters.model_store.bundle import read_bundle
        from exporters.onnx_runtime import pick_variant

        bundle_dir = os.environ.get("CNNLOOP_PEER_BUNDLE")
        if not bundle_dir:
            raise RuntimeError("set CNNLOOP_PEER_BUNDLE to a fetched bundle directory (Registry.fetch)")
        bundle = read_bundle(bundle_dir)
        self.variant = os.environ.get("CNNLOOP_PEER_VARIANT") or pick_variant(bundle, prefer_gpu=False)
        self.model_path = bundle.variant_path(self.variant)
        self.labels = list(bundle.labels)
        self.policy = bundle.policy
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cpus()  # as cnnloop: ORT's default pins a thread per node core
        self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=1000)
    def predict(self, images: list[Image.Image]) -> list[dict]:
        batch = np.stack([model_input(image, self.policy) for image in images])
        (probabilities,) = self.session.run(["probabilities"], {self.input_name: batch})
        top = probabilities.argmax(axis=1)
        return [{"label": self.labels[j], "confidence": float(p[j])} for j, p in zip(top, probabilities)]
