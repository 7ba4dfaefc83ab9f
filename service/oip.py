"""The Open Inference Protocol v2 (KServe / Triton REST) as cnnloop speaks it: the names, the
metadata, the error body and the encoding of an answer. Pure: no server, no model.

One model, MODEL_NAME, with two alternative inputs (a request carries exactly one):
  FILES  "images" BYTES [N]: each element one encoded image file, decoded as /predict decodes uploads;
  PIXELS "pixels" UINT8 [N, H, W, 3]: decoded RGB, resized and cropped like a file of those pixels.
Outputs: probabilities FP32 [N, K] (calibrated when the bundle is), label BYTES [N], prediction_id BYTES [N]
(for POST /feedback), prediction_set BOOL [N, K] (column k: class k is in the image's conformal set;
every class when the bundle has no calibration, the trivial set), abstained BOOL [N].
service/oip_request.py parses a request body; service/oip_routes.py serves both.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.errors import ServiceError
from service.request_validation import PixelImage, Upload

if TYPE_CHECKING:
    from service.predictions import Classification

MODEL_NAME = "cnnloop"
PREFIX = "/v2"
FILES, PIXELS = "images", "pixels"
OUTPUTS = ("probabilities", "label", "prediction_id", "prediction_set", "abstained")
HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {FILES: "BYTES", PIXELS: "UINT8"}


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    images: list[Upload | PixelImage]
    outputs: tuple[RequestedOutput, ...]
    request_id: str | None = None


def error_body(error: ServiceError) -> dict:
    """The protocol's error object (tritonclient raises with its "error") plus cnnloop's code."""
    body = {"error": error.message, "code": error.code}
    if error.detail:
        body["detail"] = error.detail
    return body


def server_metadata(version: str) -> dict:
    return {"name": MODEL_NAME, "version": version, "extensions": ["binary_tensor_data"]}


def _tensor(name: str, datatype: str, shape: list[int]) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape}


def model_metadata(version: str, labels: list[str]) -> dict:
    """Inputs are alternatives (a request carries one); `labels` names the columns of probabilities."""
    return {
        "name": MODEL_NAME, "versions": [version], "platform": "onnxruntime",
        "inputs": [_tensor(FILES, "BYTES", [-1]), _tensor(PIXELS, "UINT8", [-1, -1, -1, 3])],
        "outputs": [_tensor("probabilities", "FP32", [-1, len(labels)]), _tensor("label", "BYTES", [-1]),
                    _tensor("prediction_id", "BYTES", [-1]), _tensor("prediction_set", "BOOL", [-1, len(labels)]),
                    _tensor("abstained", "BOOL", [-1])],
        "parameters": {"labels": list(labels)},
    }


# response ------------------------------------------------------------------------------------

def _bytes_tensor(values: list[str]) -> bytes:
    encoded = [v.encode() for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def encode_infer_response(request: InferRequest, result: "Classification") -> tuple[bytes, int | None]:
    """(body, JSON length when binary outputs follow it, else None) for the outputs the request asked for."""
    n = len(result.records)
    values = {"probabilities": ("FP32", [n, len(result.labels)], np.asarray(result.probabilities, dtype="<f4")),
              "label": ("BYTES", [n], [r.label for r in result.records]),
              "prediction_id": ("BYTES", [n], [r.prediction_id for r in result.records]),
              "prediction_set": ("BOOL", [n, len(result.labels)],
                                 np.ones((n, len(result.labels)), bool) if result.sets is None else result.sets.astype(bool)),
              "abstained": ("BOOL", [n], np.zeros(n, bool) if result.abstained is None else np.asarray(result.abstained, bool))}
    outputs, chunks = [], []
    for out in request.outputs:
        datatype, shape, value = values[out.name]
        entry = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary:
            raw = _bytes_tensor(value) if datatype == "BYTES" else value.tobytes()  # BOOL: one byte each
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = value if datatype == "BYTES" else value.ravel().tolist()
        outputs.append(entry)
    answer = {"model_name": MODEL_NAME, "model_version": result.model_version, "outputs": outputs,
              "parameters": {"logged": result.logged, "calibrated": result.sets is not None}}
    if request.request_id is not None:
        answer["id"] = request.request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
