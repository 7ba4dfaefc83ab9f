"""The service's settings: defaults with no environment, YAML < env, refusals that name the variable."""
from __future__ import annotations

import pytest

from service.errors import ConfigError
from service.settings import load_service_settings


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


def test_cpu_runs_single_threaded_calls_side_by_side_and_gpu_gives_ort_the_cores():
    from exporters.cpus import available_cpus

    s = load_service_settings(environ={})
    ort_threads, calls = s.resolved_inference_threads(gpu=False)
    assert ort_threads == 1 and calls >= 1
    assert s.resolved_inference_threads(gpu=True) == (available_cpus(), 2)
    assert load_service_settings(environ={"CNNLOOP_ORT_THREADS": "4"}).resolved_inference_threads(gpu=False)[0] == 4


def test_an_s3_data_dir_without_a_log_database_is_refused_naming_cnnloop_log_url():
    from service.errors import ConfigError

    with pytest.raises(ConfigError, match="set CNNLOOP_LOG_URL"):
        load_service_settings(environ={"CNNLOOP_DATA_DIR": "s3://bucket/svc"})
    with pytest.raises(ConfigError, match="not a database URL") as e:
        load_service_settings(environ={"CNNLOOP_LOG_URL": "mysql://u:hunter2@db/x"})
    assert "hunter2" not in str(e.value)
    ok = load_service_settings(environ={"CNNLOOP_DATA_DIR": "s3://bucket/svc", "CNNLOOP_LOG_URL": "postgresql://u:p@db/x"})
    assert ok.log_url == "postgresql://u:p@db/x"


def test_thread_defaults_follow_the_cores_this_process_may_use(tmp_path):
    import os
    import subprocess
    import sys

    from exporters.cpus import available_cpus

    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    for text, expected in (("150000 100000\n", min(cores, 2)), ("50000 100000\n", 1), ("max 100000\n", cores),
                           ("garbage\n", cores)):
        quota.write_text(text)
        assert available_cpus(quota) == expected, text
    assert available_cpus(tmp_path / "missing") == cores
    # taskset (a cpuset) limits what the service starts, not the node's core count.
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from service.settings import load_service_settings as l; s = l(environ={}); "
                          "print(s.resolved_decode_threads(), s.resolved_inference_threads(False)[1])"],
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["1", "1"]


def test_a_lone_batch_gets_every_core_on_cpu_and_the_setting_or_a_gpu_turns_it_off():
    from exporters.cpus import available_cpus

    s = load_service_settings(environ={})
    assert s.resolved_lone_threads(gpu=False) == (available_cpus() if available_cpus() > 1 else None)
    assert s.resolved_lone_threads(gpu=True) is None
    assert load_service_settings(environ={"CNNLOOP_ORT_THREADS": "1"}).resolved_lone_threads(gpu=False) is None
