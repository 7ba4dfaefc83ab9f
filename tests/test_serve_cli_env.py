"""`cnnloop serve` turns its flags and YAML into the CNNLOOP_* environment the BentoML worker reads."""
from __future__ import annotations

import pytest

from service.settings import load_service_settings


def test_cnnloop_serve_turns_flags_into_absolute_cnnloop_env(tmp_path, monkeypatch):
    from training.cli.serve_cmd import serve_environment

    monkeypatch.chdir(tmp_path)
    env = serve_environment({"registry": "reg", "data_dir": "s3://bucket/svc", "log_url": "postgresql://u:p@db:5432/log",
                             "batch_max_size": 8, "alias": None},
                            ["top_k=5"], None, base={"CNNLOOP_BUNDLE_CACHE_DIR": "cache"})
    assert env["CNNLOOP_REGISTRY"] == str(tmp_path / "reg")
    assert env["CNNLOOP_DATA_DIR"] == "s3://bucket/svc"
    assert env["CNNLOOP_BUNDLE_CACHE_DIR"] == str(tmp_path / "cache")
    assert (env["CNNLOOP_BATCH_MAX_SIZE"], env["CNNLOOP_TOP_K"]) == ("8", "5")
    assert "CNNLOOP_ALIAS" not in env
    settings = load_service_settings(environ=env)  # what the worker will make of it
    assert settings.batch_max_size == 8 and settings.top_k == 5
    assert env["CNNLOOP_LOG_URL"] == "postgresql://u:p@db:5432/log"
    assert settings.public_view()["log_url"] == "postgresql://u:***@db:5432/log"  # /info never shows the password


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
