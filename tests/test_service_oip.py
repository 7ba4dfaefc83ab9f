"""The Open Inference Protocol v2 routes over real HTTP (`bentoml serve`), driven by tritonclient.

One server for the module (CPU is scarce), with a predict token: infer answers like /predict on the
same images, its prediction ids take feedback, its records land in the same log, and bad requests get
the protocol's error body, which tritonclient raises with our message.
"""
from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.predictions import pixels_sha256
from tests.service_server import PREDICT_TOKEN, published_model, serve, service_env  # noqa: F401

MAX_FILES = 4
MAX_BODY = 2_000_000
MAX_PIXELS = 200_000
AUTH = {"Authorization": f"Bearer {PREDICT_TOKEN}"}


def _auth() -> dict:
    return dict(AUTH)  # a fresh dict per call: tritonclient adds its own headers to the one it is given


@pytest.fixture(scope="module")
def server(published_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service_oip")
    env = service_env(published_model.registry, tmp / "data", max_files=MAX_FILES, max_body_bytes=MAX_BODY,
                      max_pixels=MAX_PIXELS, predict_token=PREDICT_TOKEN)
    with serve(env, tmp / "server.log") as running:
        running.data_dir = tmp / "data"
        yield running


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=_auth()) as c:
        yield c


@pytest.fixture(scope="module")
def triton(server):
    c = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def _images(model, per_class: int = 1) -> list[Path]:
    splits = json.loads((model.run_dir / "splits.json").read_text())
    return [Path(p) for cls in model.classes for p in [q for q in splits["train"] if Path(q).parent.name == cls][:per_class]]


def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _pixels(model, n: int = 3) -> np.ndarray:
    """n decoded training images, all 64 x 80 (not square: the service resizes and crops them)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((80, 64))) for p in _images(model)[:n]])


def _files_input(files: list[bytes]) -> httpclient.InferInput:
    tensor = httpclient.InferInput("images", [len(files)], "BYTES")
    return tensor.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=True)


def _pixels_input(pixels: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    return tensor.set_data_from_numpy(pixels, binary_data=binary)


def _predict(client, files: list[bytes]) -> list[dict]:
    r = client.post("/predict", files=[("images", (f"f{i}", data, "image/*")) for i, data in enumerate(files)])
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _assert_same_as_predict(result, predictions: list[dict], labels: list[str], same_bytes: bool = True) -> None:
    """`same_bytes`: both routes got the same file, so each image drew the same set (its draw comes from
    the sha256 of what was sent: pixels and their PNG are two inputs, whose sets may differ)."""
    assert _strings(result.as_numpy("label")) == [p["label"] for p in predictions]
    expected = np.array([[{t["label"]: t["probability"] for t in p["top_k"]}[c] for c in labels] for p in predictions])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    sets = result.as_numpy("prediction_set")  # BOOL [N, K], decoded by tritonclient itself
    assert sets.shape == (len(predictions), len(labels)) and sets.dtype == bool
    if same_bytes:
        assert [sorted(labels[j] for j in np.flatnonzero(row)) for row in sets] == [sorted(p["prediction_set"]) for p in predictions]
    assert result.as_numpy("abstained").tolist() == [p["abstained"] for p in predictions]


# health and metadata -------------------------------------------------------------------------

def test_the_server_is_live_ready_and_speaks_the_binary_extension(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "cnnloop" and meta["version"] and "binary_tensor_data" in meta["extensions"]


def test_the_model_is_ready_and_its_metadata_names_the_version_served(triton, published_model):
    assert triton.is_model_ready("cnnloop") and triton.is_model_ready("cnnloop", published_model.version)
    meta = triton.get_model_metadata("cnnloop")
    assert meta["versions"] == [published_model.version] and meta["platform"] == "onnxruntime"
    assert {t["name"]: t["datatype"] for t in meta["inputs"]} == {"images": "BYTES", "pixels": "UINT8"}
    assert {t["name"]: t["shape"] for t in meta["outputs"]} == {"probabilities": [-1, 3], "label": [-1], "prediction_id": [-1],
                                                               "prediction_set": [-1, 3], "abstained": [-1]}
    assert meta["parameters"]["labels"] == published_model.classes
    assert triton.get_model_metadata("cnnloop", published_model.version) == meta


def test_an_unknown_model_or_version_is_404_naming_what_is_served(triton, published_model):
    assert not triton.is_model_ready("resnet50")
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("resnet50")
    assert e.value.status() == "404" and "'cnnloop'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        triton.infer("cnnloop", [_pixels_input(np.zeros((1, 4, 4, 3), np.uint8))], model_version="0" * 12, headers=_auth())
    assert e.value.status() == "404" and f"the served version is '{published_model.version}'" in e.value.message()


# infer ---------------------------------------------------------------------------------------

def test_infer_on_jpeg_files_answers_as_predict_does(triton, client, published_model):
    files = [_jpeg(p) for p in _images(published_model)]
    result = triton.infer("cnnloop", [_files_input(files)], headers=_auth())
    _assert_same_as_predict(result, _predict(client, files), published_model.classes)
    response = result.get_response()
    assert response["model_version"] == published_model.version and response["parameters"] == {"logged": True, "calibrated": True}
    assert len(set(_strings(result.as_numpy("prediction_id")))) == len(files)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_on_pixels_answers_as_predict_does_on_their_png(binary, triton, client, published_model):
    pixels = _pixels(published_model)
    result = triton.infer("cnnloop", [_pixels_input(pixels, binary)], headers=_auth())
    _assert_same_as_predict(result, _predict(client, [_png(p) for p in pixels]), published_model.classes, same_bytes=False)


def test_a_versioned_infer_with_requested_outputs_answers_only_those(triton, published_model):
    outputs = [httpclient.InferRequestedOutput("label", binary_data=False),
               httpclient.InferRequestedOutput("prediction_id", binary_data=True)]
    result = triton.infer("cnnloop", [_pixels_input(_pixels(published_model, 1))], outputs=outputs,
                          model_version=published_model.version, request_id="req-7", headers=_auth())
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "prediction_id"]
    assert result.as_numpy("probabilities") is None and result.get_response()["id"] == "req-7"
    assert _strings(result.as_numpy("label"))[0] in published_model.classes


def _committed(server, ids: list[str], timeout_s: float = 20) -> dict[str, tuple]:
    """prediction_id -> (image_sha256, image_stored, filename) once all `ids` are committed (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(server.data_dir / "predictions.sqlite3") as db:
            rows = db.execute(f"SELECT prediction_id, image_sha256, image_stored, filename FROM predictions "
                              f"WHERE prediction_id IN ({','.join('?' * len(ids))})", ids).fetchall()
        db.close()
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return {r[0]: r[1:] for r in rows}
        time.sleep(0.05)


def test_infer_records_and_stored_images_are_those_predict_keeps(triton, server, published_model):
    files = [_jpeg(p) for p in _images(published_model)[:2]]
    pixels = _pixels(published_model, 1)
    file_ids = _strings(triton.infer("cnnloop", [_files_input(files)], headers=_auth()).as_numpy("prediction_id"))
    pixel_ids = _strings(triton.infer("cnnloop", [_pixels_input(pixels)], headers=_auth()).as_numpy("prediction_id"))
    rows = _committed(server, file_ids + pixel_ids)
    for i, (pid, data) in enumerate(zip(file_ids, files)):
        sha = hashlib.sha256(data).hexdigest()
        assert rows[pid] == (sha, 1, f"images[{i}]")
        assert (server.data_dir / "images" / sha[:2] / sha).read_bytes() == data
    sha = pixels_sha256(pixels[0])
    assert rows[pixel_ids[0]] == (sha, 1, "pixels[0]")
    stored = (server.data_dir / "images" / sha[:2] / sha).read_bytes()
    image = Image.open(io.BytesIO(stored))
    assert image.format == "WEBP"  # lossless, encoded by the log writer, not on the request path
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels[0])


def test_a_prediction_id_from_infer_takes_feedback(triton, client, published_model):
    result = triton.infer("cnnloop", [_files_input([_jpeg(_images(published_model)[0])])], headers=_auth())
    pid, label = _strings(result.as_numpy("prediction_id"))[0], _strings(result.as_numpy("label"))[0]
    r = client.post("/feedback", json={"prediction_id": pid, "label": "7"})
    assert r.status_code == 200, r.text
    assert r.json()["predicted_label"] == label and r.json()["label"] == "7"


def _metric(client, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(client.get("/metrics").text)
               for s in f.samples if s.name == name)


def test_infer_moves_the_prediction_counters(triton, client, published_model):
    before = _metric(client, "cnnloop_predictions_total")
    triton.infer("cnnloop", [_pixels_input(_pixels(published_model, 2))], headers=_auth())
    assert _metric(client, "cnnloop_predictions_total") == before + 2


# auth and bad requests -----------------------------------------------------------------------

@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong-token-0123456789"}], ids=["none", "wrong"])
def test_infer_needs_the_predict_token(headers, triton, published_model):
    with pytest.raises(InferenceServerException) as e:
        triton.infer("cnnloop", [_pixels_input(_pixels(published_model, 1))], headers=headers)
    assert e.value.status() == "401" and "bearer" in e.value.message().lower()


def _too_many_pixels():
    return _pixels_input(np.zeros((1, 500, 401, 3), np.uint8))


CLIENT_ERRORS = {
    "undecodable_file": (lambda m: [_files_input([b"hello, not pixels"])], "422", "images[0]"),
    "truncated_jpeg": (lambda m: [_files_input([_jpeg(_images(m)[0])[:200]])], "422", "not a decodable image"),
    "too_many_images": (lambda m: [_pixels_input(np.zeros((MAX_FILES + 1, 2, 2, 3), np.uint8))], "413", "CNNLOOP_MAX_FILES"),
    "over_the_pixel_limit": (lambda m: [_too_many_pixels()], "422", "CNNLOOP_MAX_PIXELS"),
    "over_the_body_limit": (lambda m: [_files_input([b"\0" * (MAX_BODY + 1)])], "413", "CNNLOOP_MAX_BODY_BYTES"),
    "unknown_input_name": (lambda m: [httpclient.InferInput("input0", [1], "BYTES").set_data_from_numpy(
        np.array([b"x"], dtype=np.object_))], "400", "'images'"),
    "wrong_datatype": (lambda m: [httpclient.InferInput("pixels", [1, 2, 2, 3], "FP32").set_data_from_numpy(
        np.zeros((1, 2, 2, 3), np.float32))], "400", "must be UINT8"),
}


@pytest.mark.parametrize("case", list(CLIENT_ERRORS))
def test_tritonclient_raises_a_bad_request_with_our_message(case, triton, client, published_model):
    inputs, status, words = CLIENT_ERRORS[case]
    with pytest.raises(InferenceServerException) as e:
        triton.infer("cnnloop", inputs(published_model), headers=_auth())
    assert e.value.status() == status and words in e.value.message(), e.value.message()
    assert triton.is_server_ready()


INFER = "/v2/models/cnnloop/infer"
_HEADER = b'{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[1,1,1,3],"parameters":{"binary_data_size":3}}]}'

RAW_ERRORS = {
    "malformed_json": (lambda c: c.post(INFER, content=b'{"inputs": [', headers={"content-type": "application/json"}),
                       400, "malformed_json"),
    "wrong_content_type": (lambda c: c.post(INFER, content=b"{}", headers={"content-type": "text/plain"}),
                           415, "unsupported_media_type"),
    "shape_mismatch": (lambda c: c.post(INFER, json={"inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0, 1, 2]}]}), 400, "data_size_mismatch"),
    "binary_size_mismatch": (lambda c: c.post(INFER, content=_HEADER + b"\0\0",
                                              headers={"Inference-Header-Content-Length": str(len(_HEADER))}),
                             400, "data_size_mismatch"),
    "declared_body_over_the_limit": (lambda c: c.post(INFER, content=b"x" * (MAX_BODY + 1)), 413, "payload_too_large"),
    "unknown_route": (lambda c: c.get("/v2/repository/index"), 404, "no_such_route"),
    "unknown_route_posted": (lambda c: c.post("/v2/repository/index", json={}), 404, "no_such_route"),
    "wrong_method": (lambda c: c.get(INFER), 405, "method_not_allowed"),
    "wrong_method_on_a_get_route": (lambda c: c.post("/v2/models/cnnloop/ready"), 405, "method_not_allowed"),
}


@pytest.mark.parametrize("case", list(RAW_ERRORS))
def test_a_bad_request_gets_the_protocols_error_body_with_our_code(case, client):
    send, status, code = RAW_ERRORS[case]
    r = send(client)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["error"] and "message" not in body


# What a client meets on a path the server has with the wrong method, or on one it does not have at all.
WRONG_METHODS = {
    "get_infer": ("GET", INFER, "POST"),
    "post_model_ready": ("POST", "/v2/models/cnnloop/ready", "GET, HEAD"),
    "delete_versioned_metadata": ("DELETE", "/v2/models/cnnloop/versions/1", "GET, HEAD"),
    "put_server_metadata": ("PUT", "/v2", "GET, HEAD"),
    "unknown_method_on_live": ("BREW", "/v2/health/live", "GET, HEAD"),
}


@pytest.mark.parametrize("case", list(WRONG_METHODS))
def test_a_wrong_method_is_an_oip_405_naming_the_methods_the_path_takes(case, client):
    method, path, allow = WRONG_METHODS[case]
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["content-type"] == "application/json", r.text
    assert r.headers["allow"] == allow
    assert r.json() == {"error": f"{method} is not allowed on {path}; use {allow.replace(', ', ' or ')}",
                        "code": "method_not_allowed"}


# tritonclient's repository and model-control calls POST to routes this server does not implement.
NOT_IMPLEMENTED = {
    "repository_index": (lambda t: t.get_model_repository_index(), "POST /v2/repository/index"),
    "load_model": (lambda t: t.load_model("cnnloop"), "POST /v2/repository/models/cnnloop/load"),
}


@pytest.mark.parametrize("case", list(NOT_IMPLEMENTED))
def test_tritonclient_raises_our_404_for_a_route_not_implemented(case, triton):
    call, route = NOT_IMPLEMENTED[case]
    with pytest.raises(InferenceServerException) as e:
        call(triton)
    assert e.value.status() == "404" and e.value.message().startswith(f"no route {route};"), e.value.message()
    assert "Open Inference Protocol's health, metadata and infer routes" in e.value.message()
