"""Confidence over real HTTP: calibrated probabilities, prediction sets and abstention on /predict and
the OIP route, the abstention counter, and a bundle exported before calibration still served (raw)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.calibration import Calibration, prediction_set_mask, uniform_from_digest
from tests.service_server import export_and_publish, published_model, serve, service_env  # noqa: F401


def _images(model, n_per_class: int = 4) -> list[Path]:
    splits = json.loads((model.run_dir / "splits.json").read_text())
    paths = [Path(p) for p in splits["test"]]
    return [p for c in model.classes for p in paths if p.parent.name == c][: n_per_class * len(model.classes)]


def _files(paths):
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _oip_files(paths) -> dict:
    import base64

    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(paths)],
                        "data": [base64.b64encode(p.read_bytes()).decode() for p in paths]}]}


def _abstentions(client, version: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "cnnloop_abstentions_total" and sample.labels.get("model_version") == version:
                return sample.value
    return -1.0


@pytest.fixture(scope="module")
def calibrated(published_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confidence")
    with serve(service_env(published_model.registry, tmp / "data"), tmp / "server.log") as running:
        with running.client() as client:
            yield client


@pytest.fixture(scope="module")
def uncalibrated(published_model, tmp_path_factory):
    """The same run exported as a bundle from before calibration (no calibration.json in the run), served
    with a confidence threshold every answer falls under."""
    tmp = tmp_path_factory.mktemp("uncalibrated")
    run = tmp / "run"
    shutil.copytree(published_model.run_dir, run)
    (run / "calibration.json").unlink()
    version = export_and_publish(run, str(tmp / "registry"), variants="", promote="production")
    env = service_env(tmp / "registry", tmp / "data", abstain_below_confidence=1.0)
    with serve(env, tmp / "server.log") as running:
        with running.client() as client:
            yield client, version


def test_answers_carry_the_conformal_set_the_bundles_calibration_gives_each_image(calibrated, published_model):
    paths = _images(published_model)
    r = calibrated.post("/predict", files=_files(paths))
    assert r.status_code == 200, r.text
    info = calibrated.get("/info").json()["model"]["calibration"]
    assert info["calibrated"] is True and info["coverage"] == 0.9
    calibration = Calibration.from_json(info)
    classes = published_model.classes
    for path, answer in zip(paths, r.json()["predictions"]):
        probs = np.zeros((1, len(classes)), np.float32)
        for t in answer["top_k"]:
            probs[0, classes.index(t["label"])] = t["probability"]
        u = np.array([uniform_from_digest(hashlib.sha256(path.read_bytes()).hexdigest())])
        expected = [classes[j] for j in np.flatnonzero(prediction_set_mask(probs, calibration.qhat, u)[0])]
        assert sorted(answer["prediction_set"]) == sorted(expected)
        assert answer["abstained"] is False  # no abstention rule in this bundle or the settings
    again = calibrated.post("/predict", files=_files(paths[:3])).json()["predictions"]
    assert [a["prediction_set"] for a in again] == [a["prediction_set"] for a in r.json()["predictions"][:3]]


def test_the_oip_route_answers_sets_and_abstentions_as_bool_tensors(calibrated, published_model):
    paths = _images(published_model, 2)
    body = calibrated.post("/v2/models/cnnloop/infer", json=_oip_files(paths)).json()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert body["parameters"]["calibrated"] is True
    assert outputs["prediction_set"]["datatype"] == "BOOL" and outputs["prediction_set"]["shape"] == [len(paths), 3]
    assert outputs["abstained"]["data"] == [False] * len(paths)
    http = calibrated.post("/predict", files=_files(paths)).json()["predictions"]
    sets = np.array(outputs["prediction_set"]["data"]).reshape(len(paths), 3)
    for row, answer in zip(sets, http):
        assert sorted(published_model.classes[j] for j in np.flatnonzero(row)) == sorted(answer["prediction_set"])


def test_an_uncalibrated_bundle_is_served_raw_and_says_so(uncalibrated, published_model):
    client, version = uncalibrated
    info = client.get("/info").json()["model"]["calibration"]
    assert info["calibrated"] is False and "re-export" in info["why"]
    answers = client.post("/predict", files=_files(_images(published_model, 1))).json()["predictions"]
    assert all(a["prediction_set"] is None for a in answers)


def test_answers_under_the_confidence_threshold_abstain_on_both_routes_and_are_counted(uncalibrated, published_model):
    client, version = uncalibrated
    before = _abstentions(client, version)
    assert before >= 0  # the served version has its series (the test above already abstained on 3)
    paths = _images(published_model, 2)
    answers = client.post("/predict", files=_files(paths)).json()["predictions"]
    assert all(a["abstained"] is True and a["top_k"] for a in answers)  # still with its answers
    body = client.post("/v2/models/cnnloop/infer", json=_oip_files(paths)).json()
    assert {o["name"]: o for o in body["outputs"]}["abstained"]["data"] == [True] * len(paths)
    assert body["parameters"]["calibrated"] is False
    assert _abstentions(client, version) == before + 2 * len(paths)
