"""`cnnloop drift` and `cnnloop retrain` at the edge: bad flags, config and stores get exit codes and a clear line."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from exporters.storage import open_store
from training.cli import app
from training.cli.loop_options import parse_duration, parse_since
from training.retrain.lock import StoreLock

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, list(args), env=env)


def test_drift_on_a_missing_data_dir_exits_2_and_names_the_setting(tmp_path):
    r = invoke("drift", "--registry", str(tmp_path / "reg"), "--data-dir", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "CNNLOOP_DATA_DIR" in r.output
    assert not (tmp_path / "nope").exists(), "a read-only command must not create the data dir"


def test_drift_without_a_production_model_exits_2(tmp_path):
    (tmp_path / "data").mkdir()
    r = invoke("drift", "--registry", str(tmp_path / "reg"), "--data-dir", str(tmp_path / "data"))
    assert r.exit_code == 2 and "no production version" in r.output


@pytest.mark.parametrize("args,phrase", [
    (["drift", "--since", "yesterday"], "neither a duration"),
    (["drift", "--since", "2h", "--last", "10"], "not both"),
    (["drift", "--last", "0"], "not in the range x>=1"),
    (["retrain", "--every", "often"], "not a duration"),
    (["retrain", "--device", "tpu"], "auto, cpu, cuda"),
    (["retrain", "--label-check", "drop"], "'exclude', 'keep' or 'downweight'"),
])
def test_bad_flags_exit_2_saying_what_is_wrong(args, phrase):
    r = invoke(*args)
    assert r.exit_code == 2 and phrase in r.output


def test_bad_env_setting_exits_2_naming_the_variable(tmp_path):
    r = invoke("drift", env={"CNNLOOP_ALPHA": "3"})
    assert r.exit_code == 2 and "CNNLOOP_ALPHA" in r.output


def test_unknown_key_in_the_yaml_config_exits_2(tmp_path):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("alpah: 0.01\n")
    r = invoke("retrain", "--config", str(cfg))
    assert r.exit_code == 2 and "alpah" in r.output


def test_retrain_while_another_run_holds_the_lock_exits_4(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with StoreLock(open_store(str(data)), ttl_s=600):
        r = invoke("retrain", "--registry", str(tmp_path / "reg"), "--data-dir", str(data))
    assert r.exit_code == 4 and "another retrain run holds" in r.output


def test_durations_and_times_parse():
    assert parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-11-24T10:00", now=0) == parse_since("2026-11-24T10:00+00:00", now=0)


def test_an_s3_endpoint_without_a_scheme_is_refused_as_the_service_refuses_it():
    r = invoke("drift", env={"CNNLOOP_S3_ENDPOINT_URL": "minio:9000"})
    assert r.exit_code == 2 and "must start with http://" in r.output


def test_retrain_on_a_device_this_machine_lacks_exits_2_before_taking_the_lock(tmp_path):
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: cuda:0 on a machine without any
    data = tmp_path / "data"
    data.mkdir()
    with StoreLock(open_store(str(data)), ttl_s=600):  # had the pass started, it would exit 4 on this lock
        r = invoke("retrain", "--registry", str(tmp_path / "reg"), "--data-dir", str(data), "--device", missing)
    assert r.exit_code == 2 and f"device '{missing}'" in r.output


def test_retrain_refuses_cuda_1_without_a_second_gpu_before_any_work(tmp_path):
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has a second GPU")
    r = invoke("retrain", "--registry", str(tmp_path / "reg"), "--data-dir", str(tmp_path / "nope"), "--device", "cuda:1")
    assert r.exit_code == 2 and "device 'cuda:1'" in r.output and "CNNLOOP_DATA_DIR" not in r.output


def test_drift_takes_the_s3_endpoint_flag_over_the_variable():
    r = invoke("drift", "--s3-endpoint-url", "minio:9000", env={"CNNLOOP_S3_ENDPOINT_URL": "http://minio:9000"})
    assert r.exit_code == 2 and "got 'minio:9000'" in r.output
