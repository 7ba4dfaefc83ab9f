"""The service's plain modules, without a server: settings, auth, batching, drift, the prediction log."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from pydantic import SecretStr

from service.auth import require_bearer
from service.batcher import AdaptiveBatcher
from service.errors import ConfigError, Unauthorized
from exporters.reference_stats import psi
from service.live_drift import LiveDrift
from exporters.prediction_log import PredictionRecord, SqlitePredictionLog, new_record_id, record_date
from service.settings import load_service_settings


# settings ------------------------------------------------------------------------------------

def test_settings_defaults_work_with_no_environment():
    s = load_service_settings(environ={})
    assert (s.registry, s.data_dir, s.alias) == ("./registry", "./data/service", "production")


def test_settings_env_overrides_yaml(tmp_path):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("batch_max_size: 8\ntop_k: 2\n")
    s = load_service_settings(environ={"CNNLOOP_CONFIG": str(cfg), "CNNLOOP_BATCH_MAX_SIZE": "16"})
    assert (s.batch_max_size, s.top_k) == (16, 2)


@pytest.mark.parametrize("env, says", [
    ({"CNNLOOP_BATCH_MAX_SIZE": "0"}, "batch_max_size"),
    ({"CNNLOOP_STORE_SAMPLE_RATE": "1.5"}, "store_sample_rate"),
    ({"CNNLOOP_DATA_DIR": "gs://bucket/x"}, "only local paths and s3://"),
    ({"CNNLOOP_API_TOKEN": "secretval"}, "at least 16 characters"),
    ({"CNNLOOP_MAX_PIXELS": "999999999999"}, "hard limit"),
])
def test_settings_refuse_bad_values_naming_the_variable(env, says):
    with pytest.raises(ConfigError, match=says) as e:
        load_service_settings(environ=env)
    assert "secretval" not in str(e.value)  # a token is never echoed


def test_yaml_with_unknown_setting_is_refused(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("batch_size: 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'batch_size'"):
        load_service_settings(config_file=cfg, environ={})


# auth ----------------------------------------------------------------------------------------

def test_bearer_token_checks():
    token = SecretStr("t" * 24)
    require_bearer(None, None, "/x")  # no token configured: open
    require_bearer("Bearer " + "t" * 24, token, "/x")
    for header in (None, "", "Basic abc", "Bearer", "Bearer " + "t" * 23, "bearer " + "u" * 24):
        with pytest.raises(Unauthorized):
            require_bearer(header, token, "/x")


# batching ------------------------------------------------------------------------------------

class _RecordingModel:
    def __init__(self, n_classes=3):
        self.calls: list[int] = []
        self.n_classes = n_classes
        self.lock = threading.Lock()

    def run(self, images):
        with self.lock:
            self.calls.append(len(images))
        flat = images.reshape(len(images), -1).astype(np.float32)
        probs = np.tile(flat[:, :1], (1, self.n_classes))  # each image's first pixel: lets tests check routing
        return probs, flat[:, :2]


def _images(values):
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])


def test_concurrent_requests_share_batches_and_get_their_own_results():
    async def main():
        model = _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=16, max_latency_ms=50)
        batcher.start()
        results = await asyncio.gather(*(batcher.run(model, _images([i, i])) for i in range(20)))
        await batcher.stop()
        return model, results

    model, results = asyncio.run(main())
    for i, (probs, embs) in enumerate(results):
        assert probs.shape == (2, 3) and np.all(probs == i)
    assert sum(model.calls) == 40 and max(model.calls) == 16 and len(model.calls) <= 4


def test_images_for_different_models_never_share_a_batch():
    async def main():
        old, new = _RecordingModel(), _RecordingModel()
        batcher = AdaptiveBatcher(max_batch_size=32, max_latency_ms=20)
        batcher.start()
        await asyncio.gather(*(batcher.run(old if i % 2 else new, _images([i])) for i in range(10)))
        await batcher.stop()
        return old, new

    old, new = asyncio.run(main())
    assert sum(old.calls) == 5 and sum(new.calls) == 5


# live drift ----------------------------------------------------------------------------------

def test_psi_is_zero_for_the_same_distribution_and_grows_with_shift():
    prior = np.array([0.5, 0.3, 0.2])
    assert psi(prior, prior * 100) == pytest.approx(0.0, abs=1e-12)
    assert psi(prior, [10, 30, 60]) > psi(prior, [45, 35, 20]) > 0


def test_live_drift_window_keeps_only_recent_predictions():
    drift = LiveDrift(np.array([0.5, 0.5]), reference_confidence=0.9, window=10)
    drift.observe(np.zeros(50, int), np.full(50, 0.6))
    scores = drift.observe(np.ones(10, int), np.full(10, 0.8))
    assert scores.window == 10
    assert scores.confidence_shift == pytest.approx(-0.1)
    assert scores.class_psi > 1  # the window holds only class 1 now


# prediction log ------------------------------------------------------------------------------

def _record(label="a", sha="ab" * 32) -> PredictionRecord:
    now = 1_700_000_000.0
    return PredictionRecord(prediction_id=new_record_id(now), created_at=now, model_version="v1", label=label,
                            confidence=0.9, probabilities=[0.9, 0.1], image_sha256=sha, image_stored=True,
                            filename="x.jpg", embedding=np.ones(4, np.float16).tobytes(), embedding_space="raw")


def test_record_ids_are_unique_and_carry_their_date():
    ids = {new_record_id(1_700_000_000.0) for _ in range(1000)}
    assert len(ids) == 1000
    assert record_date(next(iter(ids))) == "2023-11-14"


def test_sqlite_log_feedback_latest_label_wins_and_repeats_are_idempotent(tmp_path):
    log = SqlitePredictionLog(tmp_path)
    rec = _record(label="a")
    log.add_predictions([rec])
    first = log.record_feedback(rec.prediction_id, "b")
    again = log.record_feedback(rec.prediction_id, "b")
    last = log.record_feedback(rec.prediction_id, "a")
    assert (first.changed, again.changed, last.changed) == (True, False, True)
    assert last.previous_label == "b"
    assert log.get_prediction(rec.prediction_id).feedback_label == "a"
    assert log.feedback_summary() == (1, 1)
    assert log.record_feedback("0" * 32, "a") is None
    n_events = log._db.execute("SELECT COUNT(*) FROM feedback_events").fetchone()[0]
    assert n_events == 2
    log.close()


def test_sqlite_log_is_in_wal_mode_and_survives_reopen(tmp_path):
    log = SqlitePredictionLog(tmp_path)
    rec = _record()
    log.add_predictions([rec])
    log.record_feedback(rec.prediction_id, "b")
    assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    log.close()
    again = SqlitePredictionLog(tmp_path)
    assert again.get_prediction(rec.prediction_id).feedback_label == "b"
    again.close()


def test_s3_log_replicas_writing_at_once_lose_and_overwrite_nothing(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto import mock_aws

    from exporters.storage import open_store
    from exporters.prediction_log import S3PredictionLog

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="loop")
        replicas = [S3PredictionLog(open_store("s3://loop/service")) for _ in range(3)]

        def write(i):
            log = replicas[i % 3]
            rec = _record(sha=f"{i:064x}")
            log.store_image(rec.image_sha256, b"same bytes")
            log.add_predictions([rec])
            return rec.prediction_id

        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(write, range(60)))
        reader = replicas[0]
        assert all(reader.get_prediction(pid).image_sha256 == f"{i:064x}" for i, pid in enumerate(ids))
        assert len([k for k in reader.store.list("predictions") if k.endswith(".json")]) == 60
        assert reader.store.list("predictions")[0].startswith("predictions/2023-11-14/")

        pid = ids[0]
        assert replicas[1].record_feedback(pid, "b").changed
        assert not replicas[2].record_feedback(pid, "b").changed  # idempotent across replicas
        assert replicas[0].record_feedback(pid, "a").previous_label == "b"
        assert replicas[2].get_prediction(pid).feedback_label == "a"
        assert replicas[0].record_feedback("f" * 32, "a") is None
        assert [(e.label, e.source) for e in reader.labeled_examples()] == [("a", "feedback")]


def test_the_service_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import service.service, service.runtime, service.http_app, exporters.prediction_log; "
            "bad = [m for m in ('torch', 'torchvision', 'training') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cnnloop_serve_turns_flags_into_absolute_cnnloop_env(tmp_path, monkeypatch):
    from training.cli.serve_cmd import serve_environment

    monkeypatch.chdir(tmp_path)
    env = serve_environment({"registry": "reg", "data_dir": "s3://bucket/svc", "batch_max_size": 8, "alias": None},
                            ["top_k=5"], None, base={"CNNLOOP_BUNDLE_CACHE_DIR": "cache"})
    assert env["CNNLOOP_REGISTRY"] == str(tmp_path / "reg")
    assert env["CNNLOOP_DATA_DIR"] == "s3://bucket/svc"
    assert env["CNNLOOP_BUNDLE_CACHE_DIR"] == str(tmp_path / "cache")
    assert (env["CNNLOOP_BATCH_MAX_SIZE"], env["CNNLOOP_TOP_K"]) == ("8", "5")
    assert "CNNLOOP_ALIAS" not in env
    settings = load_service_settings(environ=env)  # what the worker will make of it
    assert settings.batch_max_size == 8 and settings.top_k == 5


def test_cnnloop_serve_resolves_default_and_yaml_paths_where_it_was_typed(tmp_path, monkeypatch):
    """`cnnloop drift` in the same folder must find the log the service writes (the worker runs elsewhere)."""
    from training.cli.serve_cmd import serve_environment

    monkeypatch.chdir(tmp_path)
    env = serve_environment({}, [], None, base={})
    assert (env["CNNLOOP_REGISTRY"], env["CNNLOOP_DATA_DIR"]) == (str(tmp_path / "registry"), str(tmp_path / "data/service"))
    (tmp_path / "svc.yaml").write_text("data_dir: logs\n")
    env = serve_environment({}, [], tmp_path / "svc.yaml", base={})
    assert env["CNNLOOP_DATA_DIR"] == str(tmp_path / "logs")


def test_cnnloop_serve_refuses_tokens_on_the_command_line():
    import typer

    from training.cli.serve_cmd import serve_environment

    with pytest.raises(typer.Exit):
        serve_environment({}, ["api_token=abcdefghijklmnopqrstuvwxyz"], None, base={})


def test_cpu_runs_single_threaded_calls_side_by_side_and_gpu_keeps_ort_threads():
    s = load_service_settings(environ={})
    ort_threads, calls = s.resolved_inference_threads(gpu=False)
    assert ort_threads == 1 and calls >= 1
    assert s.resolved_inference_threads(gpu=True) == (None, 2)
    assert load_service_settings(environ={"CNNLOOP_ORT_THREADS": "4"}).resolved_inference_threads(gpu=False)[0] == 4
