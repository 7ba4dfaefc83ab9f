"""The service over real HTTP (`bentoml serve`): predictions, batching, bad input, feedback, metrics.

One server for the whole module (CPU is scarce); tests that change state use their own images.
"""
from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service_server import ensure_prometheus, prometheus_scraping, published_model, serve, service_env  # noqa: F401

MAX_FILES = 10
MAX_BODY = 2_000_000
MAX_PIXELS = 1_000_000  # under the decoder's own limit, so the service's limit answers


@pytest.fixture(scope="module")
def server(published_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service_http")
    env = service_env(published_model.registry, tmp / "data", max_files=MAX_FILES, max_body_bytes=MAX_BODY,
                      max_pixels=MAX_PIXELS)
    with serve(env, tmp / "server.log") as running:
        running.data_dir = tmp / "data"
        yield running


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _train_images(model, per_class: int = 3) -> list[Path]:
    splits = json.loads((model.run_dir / "splits.json").read_text())
    chosen = []
    for cls in model.classes:
        chosen += [Path(p) for p in splits["train"] if Path(p).parent.name == cls][:per_class]
    return chosen


def _files(paths: list[Path]) -> list[tuple]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _one_image(model) -> Path:
    return _train_images(model, 1)[0]


def _metric_samples(client) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
            out[key] = s.value
    return out


def _in_process_probabilities(model, paths: list[Path], tmp: Path):
    """What the published bundle itself says about `paths`, without the service: its graph's
    probabilities under its own calibration (what the service must serve)."""
    import numpy as np

    from exporters.calibration import Calibration
    from exporters.onnx_runtime import load_bundle_model
    from exporters.preprocess import load_model_input
    from exporters.model_store.registry import Registry

    classifier, bundle = load_bundle_model(Registry.open(str(model.registry)).fetch(model.version, tmp), prefer_gpu=False)
    calibration = Calibration.from_json(bundle.calibration)
    assert calibration is not None and calibration.temperature != 1.0  # the default recipe calibrates
    return calibration.apply(classifier.run(np.stack([load_model_input(p, bundle.policy) for p in paths]))[0])


def test_predictions_are_the_models_own_and_known_images_get_their_labels(client, published_model, tmp_path):
    paths = _train_images(published_model)
    r = client.post("/predict", files=_files(paths))
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    reference = _in_process_probabilities(published_model, paths, tmp_path)
    for p, probs in zip(answers, reference):
        assert p["label"] == published_model.classes[int(probs.argmax())]
        assert abs(p["confidence"] - float(probs.max())) < 1e-5
    # Images the bundle classifies right in-process get the same, true label over HTTP.
    known = [i for i, (path, probs) in enumerate(zip(paths, reference))
             if published_model.classes[int(probs.argmax())] == path.parent.name]
    assert len(known) >= len(paths) // 2
    assert all(answers[i]["label"] == paths[i].parent.name for i in known)
    assert len({p["prediction_id"] for p in answers}) == len(paths)
    for p in answers:
        assert p["model_version"] == published_model.version
        probs = [t["probability"] for t in p["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and p["confidence"] == probs[0]


def test_concurrent_requests_are_batched_together(client, published_model):
    before = _metric_samples(client)
    path = _one_image(published_model)
    n = 24
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda _: client.post("/predict", files=_files([path])), range(n)))
    assert all(r.status_code == 200 for r in responses)
    after = _metric_samples(client)
    batches = after["cnnloop_inference_batch_size_count"] - before.get("cnnloop_inference_batch_size_count", 0)
    images = after["cnnloop_inference_batch_size_sum"] - before.get("cnnloop_inference_batch_size_sum", 0)
    assert images == n
    assert batches < n, f"{n} concurrent images ran in {batches} batches: no batching happened"


def _committed(server, sql: str, args, expect: int, timeout_s: float = 20) -> list:
    """The rows `sql` finds once `expect` of them are committed (bounded wait), or what it found by then."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(server.data_dir / "predictions.sqlite3") as db:
            rows = db.execute(sql, args).fetchall()
        db.close()
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_every_predicted_image_is_stored_content_addressed_with_its_record(client, server, published_model):
    path = _one_image(published_model)
    ids = [client.post("/predict", files=_files([path])).json()["predictions"][0]["prediction_id"] for _ in range(2)]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = _committed(server, "SELECT image_sha256, model_version, probabilities, embedding FROM predictions "
                      "WHERE prediction_id IN (?, ?)", ids, expect=2)  # the log writer commits after the answer
    assert (server.data_dir / "images" / sha[:2] / sha).read_bytes() == path.read_bytes()
    assert len(rows) == 2 and all(r[0] == sha and r[1] == published_model.version for r in rows)
    assert all(len(json.loads(r[2])) == 3 and r[3] for r in rows)


def test_feedback_is_recorded_idempotent_and_the_latest_label_wins(client, server, published_model):
    answer = client.post("/predict", files=_files([_one_image(published_model)])).json()["predictions"][0]
    pid = answer["prediction_id"]
    first = client.post("/feedback", json={"prediction_id": pid, "label": "1"}).json()
    repeat = client.post("/feedback", json={"prediction_id": pid, "label": "1"}).json()
    last = client.post("/feedback", json={"prediction_id": pid, "label": "7"}).json()
    assert (first["changed"], repeat["changed"], last["changed"]) == (True, False, True)
    assert last["previous_label"] == "1" and last["predicted_label"] == answer["label"]
    with sqlite3.connect(server.data_dir / "predictions.sqlite3") as db:
        assert db.execute("SELECT feedback_label FROM predictions WHERE prediction_id = ?", (pid,)).fetchone() == ("7",)
        assert db.execute("SELECT COUNT(*) FROM feedback_events WHERE prediction_id = ?", (pid,)).fetchone() == (2,)


def test_a_labeled_upload_is_stored_with_its_label(client, server, published_model):
    path = _train_images(published_model)[-1]
    r = client.post("/feedback/image", files={"image": (path.name, path.read_bytes(), "image/png")}, data={"label": "7"})
    assert r.status_code == 201, r.text
    sha = r.json()["image_sha256"]
    assert (server.data_dir / "images" / sha[:2] / sha).is_file()
    with sqlite3.connect(server.data_dir / "predictions.sqlite3") as db:
        assert db.execute("SELECT label FROM labeled_uploads WHERE upload_id = ?", (r.json()["upload_id"],)).fetchone() == ("7",)


def test_info_shows_the_model_and_the_providers_actually_used(client, published_model):
    info = client.get("/info").json()
    assert info["ready"] is True
    assert info["model"]["version"] == published_model.version
    assert info["model"]["labels"] == published_model.classes
    assert "CPUExecutionProvider" in info["providers"]
    assert info["settings"]["auth"] == {"api_token": False, "predict_token": False}
    assert info["log"]["database"].startswith("sqlite:///") and info["log"]["queued"] >= 0
    assert info["log"]["queue_size"] == info["settings"]["log_queue_size"] > 0  # off the request path by default


# bad input -----------------------------------------------------------------------------------

def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG whose header claims 20000 x 20000 pixels (400 MP)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 20000, 20000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def _predict_then_feedback(label: str):
    def send(c: httpx.Client, model) -> httpx.Response:
        pid = c.post("/predict", files=_files([_one_image(model)])).json()["predictions"][0]["prediction_id"]
        return c.post("/feedback", json={"prediction_id": pid, "label": label})
    return send


BAD_INPUTS = {
    "not_an_image": (lambda c, m: c.post("/predict", files=[("images", ("a.jpg", b"hello, not pixels"))]), 422, "bad_image"),
    "truncated_jpeg": (lambda c, m: c.post("/predict", files=[("images", ("t.jpg", _jpeg(_one_image(m))[:300]))]), 422, "bad_image"),
    "zero_byte_file": (lambda c, m: c.post("/predict", files=[("images", ("empty.jpg", b""))]), 422, "bad_image"),
    "decompression_bomb": (lambda c, m: c.post("/predict", files=[("images", ("bomb.png", _bomb_png()))]), 422, "bad_image"),
    "over_the_pixel_limit": (lambda c, m: c.post("/predict", files=[("images", ("big.png", _png_of(1250, 801)))]), 422,
                             "too_many_pixels"),
    "body_over_limit": (lambda c, m: c.post("/predict", files=[("images", ("big.jpg", b"\0" * (MAX_BODY + 1)))]), 413, "payload_too_large"),
    "missing_images_field": (lambda c, m: c.post("/predict", files=[("image", ("a.png", _one_image(m).read_bytes()))]), 400, "missing_field"),
    "too_many_files": (lambda c, m: c.post("/predict", files=_files([_one_image(m)] * (MAX_FILES + 1))), 413, "too_many_files"),
    "text_field_not_file": (lambda c, m: c.post("/predict", files=[("images", (None, "http://example.com/x.jpg"))]), 400, "not_a_file"),
    "json_body_to_predict": (lambda c, m: c.post("/predict", json={"images": ["x"]}), 415, "unsupported_media_type"),
    "multipart_without_boundary": (lambda c, m: c.post("/predict", content=b"xx", headers={"content-type": "multipart/form-data"}), 400, None),
    "malformed_json": (lambda c, m: c.post("/feedback", content=b'{"prediction_id": ', headers={"content-type": "application/json"}), 400, "malformed_json"),
    "json_not_an_object": (lambda c, m: c.post("/feedback", json=[1, 2]), 400, "malformed_json"),
    "feedback_missing_label": (lambda c, m: c.post("/feedback", json={"prediction_id": "x"}), 400, "invalid_feedback"),
    "unknown_prediction_id": (lambda c, m: c.post("/feedback", json={"prediction_id": "0" * 32, "label": "0"}), 404, "unknown_prediction"),
    "unknown_label": (_predict_then_feedback("9"), 422, "unknown_label"),
    "labeled_upload_unknown_label": (lambda c, m: c.post("/feedback/image", files={"image": ("a.png", _one_image(m).read_bytes())},
                                                        data={"label": "cat"}), 422, "unknown_label"),
}


def test_an_image_over_the_pixel_limit_is_told_the_limit_and_the_setting(client):
    r = client.post("/predict", files=[("images", ("big.png", _png_of(1250, 801)))])
    assert r.status_code == 422 and r.json()["error"] == "too_many_pixels"
    assert r.json()["message"] == ("'big.png' is 1250x801 = 1001250 pixels, over the limit of 1000000 "
                                   "(CNNLOOP_MAX_PIXELS); downscale it first")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_error_and_the_service_keeps_serving(case, client, published_model):
    send, status, code = BAD_INPUTS[case]
    r = send(client, published_model)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["message"]
    if code:
        assert body["error"] == code
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", files=_files([_one_image(published_model)])).status_code == 200


# metrics -------------------------------------------------------------------------------------

def test_metrics_has_cnnloop_series_beside_bentomls(client):
    text = client.get("/metrics").text
    for name in ("cnnloop_predictions_total", "cnnloop_prediction_confidence_bucket", "cnnloop_preprocess_seconds_bucket",
                 "cnnloop_inference_seconds_bucket", "cnnloop_inference_batch_size_bucket", "cnnloop_model_info",
                 "cnnloop_drift_class_psi", "cnnloop_drift_confidence_shift", "bentoml_"):
        assert name in text, name


def test_a_real_prometheus_scrapes_the_service(server, client, published_model, tmp_path):
    binary = ensure_prometheus()
    if binary is None:
        pytest.skip("prometheus is not installed and cannot be (needs root and apt-get)")
    client.post("/predict", files=_files(_train_images(published_model, 1)))
    with prometheus_scraping(binary, server.url, tmp_path / "prometheus") as prom:
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline:
            r = httpx.get(prom + "/api/v1/query", params={"query": 'sum(cnnloop_predictions_total{label="7"})'}).json()
            if r["status"] == "success" and r["data"]["result"]:
                value = float(r["data"]["result"][0]["value"][1])
                break
            time.sleep(1)
    assert value is not None and value >= 1
