"""What one /predict call makes of its uploads and the model's outputs: model input, log records, the answer.

Pure: bytes and arrays in, arrays, records and dicts out; no server, model or log needed to test them.
`ServingRuntime.predict` does the I/O around them (decode threads, the batcher, the log writer).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from exporters.prediction_log import PredictionRecord, encode_embedding
from exporters.preprocess import MAX_PIXELS, ImageDecodeError, ResizePolicy, TooManyPixels, load_model_input
from service.errors import Unprocessable
from service.request_validation import Upload


def model_input(index: int, upload: Upload, policy: ResizePolicy, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Upload `index` of a request as model input, or a 422 that names the file."""
    try:
        return load_model_input(upload.data, policy, max_pixels)
    except ImageDecodeError as e:
        # Over the operator's own limit (CNNLOOP_MAX_PIXELS) the client is told that limit; over the
        # decoder's hard limit it is just an image the service will not decode.
        if isinstance(e, TooManyPixels) and max_pixels < MAX_PIXELS:
            raise Unprocessable(f"'{upload.filename}' is {e.width}x{e.height} = {e.width * e.height} pixels, over the limit "
                                f"of {max_pixels} (CNNLOOP_MAX_PIXELS); downscale it first", code="too_many_pixels") from None
        raise Unprocessable(f"file {index} ('{upload.filename}'): {e}", code="bad_image",
                            index=index, filename=upload.filename) from None


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


def prediction_answer(record: PredictionRecord, labels: list[str], probabilities: np.ndarray, top: np.ndarray) -> dict:
    """What the client is told about one image; the probabilities unrounded, as the model gave them."""
    return {
        "prediction_id": record.prediction_id, "filename": record.filename, "label": record.label,
        "confidence": record.confidence, "model_version": record.model_version,
        "top_k": [{"label": labels[j], "probability": float(probabilities[j])} for j in top],
    }


def predict_answer(model_version: str, answers: list[dict], logged: bool) -> dict:
    """The /predict body; `logged=False` on every prediction the log did not take (queue full, a failed
    synchronous write, or log_predictions off): they cannot get feedback."""
    if not logged:
        answers = [{**a, "logged": False} for a in answers]
    return {"model_version": model_version, "predictions": answers}
