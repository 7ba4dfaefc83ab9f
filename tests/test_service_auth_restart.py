"""Bearer tokens on /feedback, /admin/* and /predict; feedback that outlives a restart.

This module's server is started by `cnnloop serve` (settings from CNNLOOP_* env), the other
modules' by `bentoml serve`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service_server import API_TOKEN, PREDICT_TOKEN, published_model, serve, service_env  # noqa: F401


def _image(model) -> Path:
    splits = json.loads((model.run_dir / "splits.json").read_text())
    return Path(splits["train"][0])


def _predict(client, model, token=PREDICT_TOKEN):
    path = _image(model)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/predict", files=[("images", (path.name, path.read_bytes()))], headers=headers)


@pytest.fixture(scope="module")
def state(published_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service_auth")
    env = service_env(published_model.registry, tmp / "data", api_token=API_TOKEN, predict_token=PREDICT_TOKEN)
    return {"env": env, "tmp": tmp}


@pytest.fixture(scope="module")
def server(state):
    with serve(state["env"], state["tmp"] / "server.log", via_cli=True) as running:
        yield running


API = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0000000000"},
                                     {"Authorization": f"Basic {API_TOKEN}"}, {"Authorization": f"Bearer {PREDICT_TOKEN}"}])
def test_feedback_and_admin_refuse_missing_or_wrong_tokens(server, headers):
    with server.client() as c:
        r1 = c.post("/feedback", json={"prediction_id": "0" * 32, "label": "0"}, headers=headers)
        r2 = c.post("/admin/reload", headers=headers)
    assert r1.status_code == r2.status_code == 401
    assert r1.json()["error"] == "unauthorized" and r1.headers["www-authenticate"] == "Bearer"


def test_predict_has_its_own_token(server, published_model):
    with server.client() as c:
        assert _predict(c, published_model, token=None).status_code == 401
        assert _predict(c, published_model, token=API_TOKEN).status_code == 401
        assert _predict(c, published_model).status_code == 200


def test_right_tokens_open_feedback_and_admin(server, published_model):
    with server.client() as c:
        pid = _predict(c, published_model).json()["predictions"][0]["prediction_id"]
        assert c.post("/feedback", json={"prediction_id": pid, "label": "7"}, headers=API).status_code == 200
        reload = c.post("/admin/reload", headers=API)
    assert reload.status_code == 200 and reload.json()["outcome"] == "unchanged"


def test_info_and_health_stay_open(server):
    with server.client() as c:
        assert c.get("/readyz").status_code == 200
        assert c.get("/info").json()["settings"]["auth"] == {"api_token": True, "predict_token": True}


def test_feedback_is_still_there_after_a_restart(server, state, published_model):
    with server.client() as c:
        pid = _predict(c, published_model).json()["predictions"][0]["prediction_id"]
        assert c.post("/feedback", json={"prediction_id": pid, "label": "1"}, headers=API).json()["changed"] is True
    server.stop()
    with serve(state["env"], state["tmp"] / "server2.log") as again, again.client() as c:
        r = c.post("/feedback", json={"prediction_id": pid, "label": "1"}, headers=API).json()
        info = c.get("/info").json()
    assert r["previous_label"] == "1" and r["changed"] is False
    assert info["feedback"]["labeled_predictions"] >= 2


def test_bad_settings_stop_the_server_at_start_with_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    from tests.service_server import ROOT

    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "CNNLOOP_MAX_FILES": "0", "CNNLOOP_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:CnnloopService", "--port", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "invalid service settings: 'max_files'" in result.stdout + result.stderr
    assert "env CNNLOOP_MAX_FILES" in result.stdout + result.stderr
