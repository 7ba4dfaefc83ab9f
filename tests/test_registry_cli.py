"""`cnnloop registry ...` through typer's CliRunner on the sub-app itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exporters.model_store.registry import Registry
from tests.s3_server import free_port
from training.cli.registry_cmd import app

runner = CliRunner()


@pytest.fixture
def bundle(tmp_path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"onnx" * 64)
    return d


@pytest.fixture
def registry_dir(tmp_path) -> Path:
    return tmp_path / "registry"


def publish(registry_dir: Path, bundle: Path, **meta) -> str:
    return Registry.open(str(registry_dir)).publish(bundle, meta)


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env)


def test_list_json_gives_versions_with_their_aliases(registry_dir, bundle):
    v1, v2 = publish(registry_dir, bundle), publish(registry_dir, bundle)
    Registry.open(str(registry_dir)).promote(v2)
    res = invoke("list", "--registry", str(registry_dir), "--json")
    assert res.exit_code == 0
    assert [(r["version"], r["aliases"]) for r in json.loads(res.stdout)] == [(v1, []), (v2, ["production"])]


def test_list_prints_a_table_with_version_backbone_and_accuracy(registry_dir, bundle):
    v = publish(registry_dir, bundle, backbone="lite0", metrics={"val": {"accuracy": 0.9375}})
    res = invoke("list", "--registry", str(registry_dir))
    assert res.exit_code == 0 and v in res.stdout and "lite0" in res.stdout and "0.9375" in res.stdout


def test_list_of_an_empty_registry_says_how_to_publish(registry_dir):
    res = invoke("list", "--registry", str(registry_dir))
    assert res.exit_code == 0 and "cnnloop export" in res.stdout


def test_registry_defaults_to_the_cnnloop_registry_variable(registry_dir, bundle):
    v = publish(registry_dir, bundle)
    res = invoke("list", "--json", env={"CNNLOOP_REGISTRY": str(registry_dir)})
    assert [r["version"] for r in json.loads(res.stdout)] == [v]


def test_show_json_prints_the_whole_bundle_json(registry_dir, bundle):
    v = publish(registry_dir, bundle, labels=["ant", "bee"])
    res = invoke("show", v, "--registry", str(registry_dir), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == Registry.open(str(registry_dir)).show(v)


def test_show_accepts_an_alias(registry_dir, bundle):
    v = publish(registry_dir, bundle)
    Registry.open(str(registry_dir)).promote(v, "candidate")
    res = invoke("show", "candidate", "--registry", str(registry_dir), "--json")
    assert json.loads(res.stdout)["version"] == v


def test_show_prints_files_with_their_checksums(registry_dir, bundle):
    v = publish(registry_dir, bundle)
    sha = Registry.open(str(registry_dir)).show(v)["files"]["model.onnx"]["sha256"]
    res = invoke("show", v, "--registry", str(registry_dir))
    assert res.exit_code == 0 and "model.onnx" in res.stdout and sha in res.stdout


def test_promote_then_rollback_moves_production_and_back(registry_dir, bundle):
    v1, v2 = publish(registry_dir, bundle), publish(registry_dir, bundle)
    assert invoke("promote", v1, "--registry", str(registry_dir)).exit_code == 0
    res = invoke("promote", v2, "--registry", str(registry_dir))
    assert res.exit_code == 0 and f"production: {v1} -> {v2}" in res.stdout
    res = invoke("rollback", "--registry", str(registry_dir), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == {"alias": "production", "version": v1, "previous": v2, "changed": True}


def test_promote_with_alias_option_moves_only_that_alias(registry_dir, bundle):
    v = publish(registry_dir, bundle)
    assert invoke("promote", v, "--alias", "candidate", "--registry", str(registry_dir)).exit_code == 0
    reg = Registry.open(str(registry_dir))
    assert (reg.resolve("candidate"), reg.resolve("production")) == (v, None)


def test_unknown_version_exits_2_naming_it(registry_dir, bundle):
    publish(registry_dir, bundle)
    res = invoke("show", "v20200101-000000-000000", "--registry", str(registry_dir))
    assert res.exit_code == 2 and "unknown version v20200101-000000-000000" in res.output


def test_traversing_version_id_exits_2(registry_dir):
    res = invoke("promote", "../../etc", "--registry", str(registry_dir))
    assert res.exit_code == 2 and "invalid version id" in res.output


def test_unknown_alias_exits_2(registry_dir, bundle):
    res = invoke("promote", publish(registry_dir, bundle), "--alias", "staging", "--registry", str(registry_dir))
    assert res.exit_code == 2 and "unknown alias" in res.output


def test_rollback_without_a_previous_version_exits_2(registry_dir, bundle):
    Registry.open(str(registry_dir)).promote(publish(registry_dir, bundle))
    res = invoke("rollback", "--registry", str(registry_dir))
    assert res.exit_code == 2 and "no previous version" in res.output


def test_unreachable_registry_exits_3_naming_the_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"
    res = invoke("list", "--registry", "s3://models/reg", "--s3-endpoint-url", endpoint,
                 env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    assert res.exit_code == 3 and "unreachable" in res.output and endpoint in res.output


def test_promote_and_list_work_against_s3(s3_bucket, tmp_path, bundle):
    uri = s3_bucket.uri("reg")
    v = Registry.open(uri, endpoint_url=s3_bucket.endpoint_url).publish(bundle, {})
    args = ("--registry", uri, "--s3-endpoint-url", s3_bucket.endpoint_url)
    assert invoke("promote", v, *args).exit_code == 0
    assert json.loads(invoke("list", *args, "--json").stdout)[0]["aliases"] == ["production"]


@pytest.mark.parametrize("command, phrase", [
    ("list", "oldest first"), ("show", "sha256"), ("promote", "rollback"), ("rollback", "before its last promote")])
def test_every_command_explains_itself_in_help(command, phrase):
    res = invoke(command, "--help")
    assert res.exit_code == 0 and phrase in " ".join(res.stdout.split()) and "CNNLOOP_REGISTRY" in res.stdout


def test_registry_commands_load_no_torch(registry_dir):
    code = ("import sys; from typer.testing import CliRunner; from training.cli.registry_cmd import app; "
            "r = CliRunner().invoke(app, ['list', '--registry', sys.argv[1]]); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(registry_dir)], check=True)


def test_list_honours_the_s3_endpoint_variable_without_a_flag(s3_bucket, bundle):
    uri = s3_bucket.uri("reg")
    v = Registry.open(uri, endpoint_url=s3_bucket.endpoint_url).publish(bundle, {})
    res = invoke("list", "--json", env={"CNNLOOP_REGISTRY": uri, "CNNLOOP_S3_ENDPOINT_URL": s3_bucket.endpoint_url})
    assert res.exit_code == 0, res.output
    assert [r["version"] for r in json.loads(res.stdout)] == [v]


@pytest.mark.parametrize("args", [("list",), ("show", "production"), ("promote", "v20200101-000000-000000"), ("rollback",)])
def test_a_scheme_less_s3_endpoint_is_refused_with_exit_2_naming_the_setting(args):
    res = invoke(*args, "--registry", "s3://models/reg", "--s3-endpoint-url", "localhost:9000")
    assert res.exit_code == 2
    assert "s3_endpoint_url" in res.output and "CNNLOOP_S3_ENDPOINT_URL" in res.output and "http://" in res.output
