"""The store flags are one set for every command: --registry, --data-dir, --s3-endpoint-url, each
with its CNNLOOP_* variable, resolved and checked by exporters.locations.StoreLocations."""
from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from exporters.locations import load_store_locations
from training.cli import app
from training.errors import TrainingError

runner = CliRunner()

STORE_COMMANDS = [("export",), ("registry", "list"), ("registry", "show"), ("registry", "promote"),
                  ("registry", "rollback"), ("drift",), ("retrain",), ("serve",)]
ENV_OF_FLAG = {"--registry": "CNNLOOP_REGISTRY", "--data-dir": "CNNLOOP_DATA_DIR", "--s3-endpoint-url": "CNNLOOP_S3_ENDPOINT_URL"}


def command(path: tuple[str, ...]) -> click.Command:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def options(path: tuple[str, ...]) -> dict[str, click.Parameter]:
    return {opt: p for p in command(path).params for opt in p.opts if opt.startswith("--")}


@pytest.mark.parametrize("path", STORE_COMMANDS, ids=" ".join)
def test_every_store_command_takes_s3_endpoint_url(path):
    assert "--s3-endpoint-url" in options(path)


@pytest.mark.parametrize("path", STORE_COMMANDS, ids=" ".join)
def test_endpoint_url_is_no_longer_accepted(path):
    args = {"export": ["export", "run"], "show": ["registry", "show", "production"],
            "promote": ["registry", "promote", "v1"]}.get(path[-1], list(path))
    res = runner.invoke(app, [*args, "--endpoint-url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "No such option: --endpoint-url" in res.output


@pytest.mark.parametrize("path", STORE_COMMANDS, ids=" ".join)
def test_the_help_of_every_store_flag_names_its_variable(path):
    flags = {flag: p for flag, p in options(path).items() if flag in ENV_OF_FLAG}
    assert "--registry" in flags and "--s3-endpoint-url" in flags
    for flag, param in flags.items():
        assert ENV_OF_FLAG[flag] in param.help, f"{' '.join(path)} {flag}: {param.help}"


def test_registry_defaults_to_the_local_registry_folder():
    assert load_store_locations({}, TrainingError, environ={}).registry == "./registry"


def test_an_empty_s3_endpoint_variable_means_aws():
    assert load_store_locations({}, TrainingError, environ={"CNNLOOP_S3_ENDPOINT_URL": ""}).s3_endpoint_url is None


def test_the_flag_wins_over_the_variable():
    loc = load_store_locations({"s3_endpoint_url": "http://flag:9000"}, TrainingError,
                               environ={"CNNLOOP_S3_ENDPOINT_URL": "http://env:9000"})
    assert loc.s3_endpoint_url == "http://flag:9000"


def test_serve_refuses_a_scheme_less_endpoint_with_exit_2_before_starting_bentoml(monkeypatch):
    def no_bentoml(*args, **kwargs):
        raise AssertionError("bentoml serve was started")

    monkeypatch.setattr("training.cli.serve_cmd.subprocess.Popen", no_bentoml)
    res = runner.invoke(app, ["serve", "--s3-endpoint-url", "localhost:9000"])
    assert res.exit_code == 2 and "CNNLOOP_S3_ENDPOINT_URL" in res.output
