"""The predict path's pure steps (service/predictions.py): arrays in, model input, records and answers out."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from exporters.prediction_log.records import decode_embedding, is_record_id, new_record_id
from exporters.preprocess import MAX_PIXELS, ResizePolicy
from service.errors import Unprocessable
from service.predictions import (build_prediction_record, embeddings_to_log, model_input, predict_answer,
                                 prediction_answer, top_k)
from service.request_validation import Upload

LABELS = ["cat", "dog", "fox"]
PROBS = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
POLICY = ResizePolicy(crop_size=16, resize_size=20)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says width x height: nothing but the header is ever read."""
    data = bytearray(_png(1, 1))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _record(i: int = 0, embedding=None, space=None, stored=True):
    top = top_k(PROBS, 2)
    return build_prediction_record(prediction_id=new_record_id(1_700_000_000.0), created_at=1_700_000_000.0,
                                   model_version="v1", labels=LABELS, probabilities=PROBS[i], top=top[i],
                                   image_sha256="ab" * 32, image_stored=stored, filename=f"{i}.png",
                                   embedding=embedding, embedding_space=space)


def test_model_input_is_the_policy_crop_of_the_image():
    array = model_input(0, Upload("a.png", _png(40, 30)), POLICY)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8 and (array[..., 0] == 200).all()


def test_an_image_over_the_configured_pixel_limit_is_refused_naming_the_setting():
    with pytest.raises(Unprocessable) as e:
        model_input(2, Upload("big.png", _png(40, 30)), POLICY, max_pixels=1000)
    assert e.value.code == "too_many_pixels"
    assert str(e.value) == ("'big.png' is 40x30 = 1200 pixels, over the limit of 1000 (CNNLOOP_MAX_PIXELS); "
                            "downscale it first")


def test_an_image_within_the_configured_pixel_limit_is_decoded():
    assert model_input(0, Upload("a.png", _png(40, 25)), POLICY, max_pixels=1000).shape == (16, 16, 3)


def test_an_image_over_the_decoders_own_limit_is_a_bad_image():
    with pytest.raises(Unprocessable) as e:
        model_input(1, Upload("huge.png", _png_claiming(8000, 7000)), POLICY, max_pixels=MAX_PIXELS)
    assert e.value.code == "bad_image"
    assert str(e.value) == f"file 1 ('huge.png'): image is 8000x7000 = 56000000 pixels, over the {MAX_PIXELS} limit"


def test_bytes_that_are_no_image_are_a_bad_image_naming_the_file_and_its_index():
    with pytest.raises(Unprocessable) as e:
        model_input(3, Upload("x.jpg", b"hello, not pixels"), POLICY, max_pixels=MAX_PIXELS)
    assert e.value.code == "bad_image" and str(e.value).startswith("file 3 ('x.jpg'): not a decodable image")


def test_top_k_is_the_most_probable_classes_first():
    assert top_k(PROBS, 2).tolist() == [[1, 2], [0, 2]]


def test_embeddings_are_logged_projected_when_the_bundle_has_a_basis_else_raw_and_never_when_off():
    embs = np.arange(6, dtype=np.float32).reshape(2, 3)
    kept, space = embeddings_to_log(embs, lambda e: e[:, :2] * 2, store=True)
    assert space == "pca" and kept.tolist() == (embs[:, :2] * 2).tolist()
    kept, space = embeddings_to_log(embs, lambda e: None, store=True)
    assert space == "raw" and kept is embs
    assert embeddings_to_log(embs, lambda e: pytest.fail("projected with storing off"), store=False) == (None, None)


def test_a_record_carries_the_top_label_its_confidence_and_rounded_probabilities():
    r = _record(0, embedding=np.array([1.5, -2.0], np.float32), space="pca")
    assert is_record_id(r.prediction_id) and r.created_at == 1_700_000_000.0 and r.model_version == "v1"
    assert (r.label, r.confidence) == ("dog", pytest.approx(0.7))
    assert r.probabilities == [round(float(p), 6) for p in PROBS[0]]
    assert (r.image_sha256, r.image_stored, r.filename) == ("ab" * 32, True, "0.png")
    assert r.embedding_space == "pca" and decode_embedding(r.embedding).tolist() == [1.5, -2.0]
    assert r.feedback_label is None and r.feedback_at is None


def test_a_record_without_a_stored_embedding_has_none():
    r = _record(1, embedding=None, space=None, stored=False)
    assert (r.label, r.embedding, r.embedding_space, r.image_stored) == ("cat", None, None, False)


def test_the_answer_names_the_record_and_its_top_k_unrounded():
    r = _record(0)
    a = prediction_answer(r, LABELS, PROBS[0], top_k(PROBS, 2)[0])
    assert a == {"prediction_id": r.prediction_id, "filename": "0.png", "label": "dog", "confidence": r.confidence,
                 "model_version": "v1",
                 "top_k": [{"label": "dog", "probability": float(PROBS[0, 1])}, {"label": "fox", "probability": float(PROBS[0, 2])}],
                 "prediction_set": None, "abstained": False}  # no calibration: no set


def test_the_answer_lists_its_prediction_set_most_probable_first_and_says_when_it_abstained():
    r = _record(0)
    a = prediction_answer(r, LABELS, PROBS[0], top_k(PROBS, 2)[0], np.array([True, True, False]), abstained=True)
    expected = sorted(LABELS[:2], key=lambda label: -PROBS[0, LABELS.index(label)])
    assert a["prediction_set"] == expected and a["abstained"] is True


def test_predictions_the_log_could_not_keep_say_logged_false():
    answers = [{"prediction_id": "p1"}, {"prediction_id": "p2"}]
    assert predict_answer("v1", answers, logged=True) == {"model_version": "v1", "predictions": answers}
    failed = predict_answer("v1", answers, logged=False)
    assert [a["logged"] for a in failed["predictions"]] == [False, False]
