"""What one prediction request makes of its images and the model's outputs: model input, log records, the answer.

Pure: bytes and arrays in, arrays, records and dicts out; no server, model or log needed to test them.
`ServingRuntime.classify` does the I/O around them (decode threads, the batcher, the log writer).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from exporters.calibration import Calibration, uniform_from_digest
from exporters.prediction_log.records import PredictionRecord, encode_embedding
from exporters.preprocess import (MAX_PIXELS, ImageDecodeError, ResizePolicy, TooManyPixels, load_array_input,
                                  load_model_input)
from service.errors import Unprocessable
from service.request_validation import PixelImage, Upload


def model_input(index: int, image: Upload | PixelImage, policy: ResizePolicy, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image `index` of a request (a file, or decoded pixels) as model input, or a 422 that names it."""
    try:
        if isinstance(image, PixelImage):
            return load_array_input(image.pixels, policy, max_pixels)
        return load_model_input(image.data, policy, max_pixels)
    except ImageDecodeError as e:
        # Over the operator's own limit (CNNLOOP_MAX_PIXELS) the client is told that limit; over the
        # decoder's hard limit it is just an image the service will not decode.
        if isinstance(e, TooManyPixels) and max_pixels < MAX_PIXELS:
            raise Unprocessable(f"'{image.filename}' is {e.width}x{e.height} = {e.width * e.height} pixels, over the limit "
                                f"of {max_pixels} (CNNLOOP_MAX_PIXELS); downscale it first", code="too_many_pixels") from None
        what = "image" if isinstance(image, PixelImage) else "file"
        raise Unprocessable(f"{what} {index} ('{image.filename}'): {e}", code="bad_image",
                            index=index, filename=image.filename) from None


def pixels_sha256(pixels: np.ndarray) -> str:
    """The name a decoded image is logged and stored under: sha256 of its shape and RGB bytes.

    Not the sha256 of the file the store keeps: naming by the file would cost a lossless encode (about
    7 ms for a 500x375 photo, see lossless_image_bytes) for every image, stored or not, and the name
    would change with the encoder's version. Pixels name one image the same way whether it is stored or not, on
    any release (retraining splits and dedupes by this name); the store reads an image by its name and
    never re-hashes it. The shape is hashed too: the same bytes as 4x6 and 6x4 are two images."""
    h, w, c = pixels.shape
    digest = hashlib.sha256(f"uint8 {h}x{w}x{c}\n".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


def lossless_image_bytes(pixels: np.ndarray) -> bytes:
    """A lossless file of decoded pixels, for the image store (retraining decodes it like any upload).

    WebP lossless at method 0: on hymenoptera photos (500x375, one core) 6.6 ms and 49% of the raw
    bytes, vs 11.5 ms / 58% for PNG at level 1 with zlib's RLE strategy (what this was), 13.6 ms / 75%
    for deflate TIFF, 0.3 ms / 100% for PPM; Pillow's QOI writer took 154 ms. Still the dearest step
    of storing a pixel image, so the log writer's threads run it, never the request
    (`ServingRuntime._prepare` hands them this function and the pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "WEBP", lossless=True, method=0, quality=0)
    return buf.getvalue()


@dataclass(frozen=True, eq=False)
class Classification:
    """What one request's images got: its records (as logged) and the model's outputs, row by row."""

    model_version: str
    labels: list[str]
    records: list[PredictionRecord]
    probabilities: np.ndarray  # calibrated when the bundle carries a calibration
    top: np.ndarray
    logged: bool  # False: the log did not take these records (queue full, failed write, logging off)
    sets: np.ndarray | None = None  # images x classes, bool: the conformal prediction sets (None: uncalibrated bundle)
    abstained: np.ndarray | None = None  # per image, bool


@dataclass(frozen=True, eq=False)
class CalibratedBatch:
    probabilities: np.ndarray
    sets: np.ndarray | None
    abstained: np.ndarray


def _limit(setting, bundle_value):
    """The service setting wins when given; 0 turns that part of the rule off."""
    value = bundle_value if setting is None else setting
    return value or None


def calibrate_batch(raw: np.ndarray, calibration: Calibration | None, image_sha256: list[str],
                    abstain_below_confidence: float | None = None, abstain_above_set_size: int | None = None) -> CalibratedBatch:
    """The graph's probabilities as served: calibrated, with their prediction sets and abstentions.

    Each image's set is drawn with its own digest (exporters.calibration), so the same image always
    gets the same set. An uncalibrated bundle is served raw, without sets; a confidence threshold
    from the settings still applies to it."""
    if calibration is None:
        below = _limit(abstain_below_confidence, None)
        abstained = raw.max(1) < below if below is not None else np.zeros(len(raw), dtype=bool)
        return CalibratedBatch(raw, None, abstained)
    probs = calibration.apply(raw)
    sets = calibration.sets(probs, np.array([uniform_from_digest(sha) for sha in image_sha256]))
    rule = Calibration(abstain_below_confidence=_limit(abstain_below_confidence, calibration.abstain_below_confidence),
                       abstain_above_set_size=_limit(abstain_above_set_size, calibration.abstain_above_set_size))
    return CalibratedBatch(probs, sets, rule.abstain(probs, sets))


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Per image (row), the indices of its k most probable classes, most probable first."""
    return np.argsort(-probabilities, axis=1)[:, :k]


def embeddings_to_log(embeddings: np.ndarray, project: Callable[[np.ndarray], np.ndarray | None],
                      store: bool) -> tuple[np.ndarray | None, str | None]:
    """(what the records keep of the pooled embeddings, in which space), or (None, None) when storing is off.

    "pca" when the bundle has a reference PCA basis (`project` returns the projection; what the drift
    report compares), else "raw".
    """
    if not store:
        return None, None
    projected = project(embeddings)
    return (embeddings, "raw") if projected is None else (projected, "pca")


def build_prediction_record(*, prediction_id: str, created_at: float, model_version: str, labels: list[str],
                            probabilities: np.ndarray, top: np.ndarray, image_sha256: str, image_stored: bool,
                            filename: str, embedding: np.ndarray | None = None,
                            embedding_space: str | None = None) -> PredictionRecord:
    """The log record of one predicted image; `probabilities` is its row, `top` its `top_k` row."""
    return PredictionRecord(
        prediction_id=prediction_id, created_at=created_at, model_version=model_version,
        label=labels[top[0]], confidence=float(probabilities[top[0]]),
        probabilities=[round(float(p), 6) for p in probabilities], image_sha256=image_sha256, image_stored=image_stored,
        filename=filename, embedding=encode_embedding(embedding) if embedding_space else None,
        embedding_space=embedding_space)


def prediction_answer(record: PredictionRecord, labels: list[str], probabilities: np.ndarray, top: np.ndarray,
                      in_set: np.ndarray | None = None, abstained: bool = False) -> dict:
    """What the client is told about one image; the probabilities unrounded, as served. The set lists
    its classes most probable first; null when the bundle has no calibration."""
    prediction_set = None
    if in_set is not None:
        members = np.flatnonzero(in_set)
        prediction_set = [labels[j] for j in members[np.argsort(-probabilities[members], kind="stable")]]
    return {
        "prediction_id": record.prediction_id, "filename": record.filename, "label": record.label,
        "confidence": record.confidence, "model_version": record.model_version,
        "top_k": [{"label": labels[j], "probability": float(probabilities[j])} for j in top],
        "prediction_set": prediction_set, "abstained": bool(abstained),
    }


def predict_answer(model_version: str, answers: list[dict], logged: bool) -> dict:
    """The /predict body; `logged=False` on every prediction the log did not take (queue full, a failed
    synchronous write, or log_predictions off): they cannot get feedback."""
    if not logged:
        answers = [{**a, "logged": False} for a in answers]
    return {"model_version": model_version, "predictions": answers}
