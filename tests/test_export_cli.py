"""`cnnloop export`: stdout is the version id alone, bad input exits 2, an unreachable registry exits 3,
an ONNX graph that disagrees with torch exits 2 and publishes nothing."""
from __future__ import annotations

import socket

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from tests.training_data import fast_config, make_digits
from training.cli import app


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always keeps stderr apart
        return CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from training.train import train

    tmp = tmp_path_factory.mktemp("export_cli")
    train(make_digits(tmp / "digits", digits=(0, 1, 7), per_class=30), tmp / "run",
          fast_config(epochs=2, strategy="finetune", lr=3e-3), show_progress=False)
    return tmp / "run"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends: nothing listens there


def test_missing_run_dir_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no-such-run"
    result = _runner().invoke(app, ["export", str(missing), "--registry", str(tmp_path / "reg")])
    assert result.exit_code == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert result.stdout == ""


def test_unknown_variant_exits_2(run_dir, tmp_path):
    result = _runner().invoke(app, ["export", str(run_dir), "--registry", str(tmp_path / "reg"), "--variants", "int4"])
    assert result.exit_code == 2 and "int4" in result.stderr


def test_unknown_parent_version_exits_2_before_exporting(run_dir, tmp_path):
    result = _runner().invoke(app, ["export", str(run_dir), "--registry", str(tmp_path / "reg"), "--parent", "v20990101-000000-abcdef"])
    assert result.exit_code == 2 and "v20990101-000000-abcdef" in result.stderr
    assert "exported model.onnx" not in result.stderr


def test_unreachable_registry_exits_3_before_exporting(run_dir, monkeypatch):
    # Dummy credentials, so the failure is the closed port itself and not missing credentials.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    result = _runner().invoke(app, ["export", str(run_dir), "--registry", "s3://bucket/models",
                                    "--s3-endpoint-url", f"http://127.0.0.1:{_closed_port()}"])
    assert result.exit_code == 3, result.stderr
    assert "127.0.0.1" in result.stderr and "exported model.onnx" not in result.stderr


def test_a_graph_that_disagrees_with_torch_exits_2_and_publishes_nothing(run_dir, tmp_path, monkeypatch):
    from exporters.export import bundle_writer
    from exporters.model_store.registry import Registry

    real_export = bundle_writer.export_onnx

    def export_then_drift(model, image_size, out_path, *args, **kwargs):
        # A real export whose weights then drift from torch's, as a faulty exporter's would: only
        # the parity check, comparing the two on the validation images, can tell.
        info = real_export(model, image_size, out_path, *args, **kwargs)
        graph = onnx.load(str(out_path))
        rng = np.random.default_rng(0)
        for init in graph.graph.initializer:
            w = onnx.numpy_helper.to_array(init)
            if w.dtype == np.float32 and w.ndim >= 2:
                init.CopyFrom(onnx.numpy_helper.from_array((w + rng.normal(0, 0.05, w.shape)).astype(np.float32), init.name))
        onnx.save(graph, str(out_path))
        return info

    monkeypatch.setattr(bundle_writer, "export_onnx", export_then_drift)
    registry_dir = tmp_path / "reg"
    result = _runner().invoke(app, ["export", str(run_dir), "--registry", str(registry_dir), "--variants", "none",
                                    "--promote", "production"])
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "parity check failed" in result.stderr and "validation images" in result.stderr
    assert result.stdout == ""  # a script capturing the version id gets none
    registry = Registry.open(str(registry_dir))
    assert registry.list_versions() == [] and registry.resolve("production") is None
    assert not [p for p in (registry_dir / "versions").rglob("*") if p.is_file()], "bundle files were uploaded"


def test_export_prints_only_the_version_id_and_the_registry_serves_it(run_dir, tmp_path):
    from exporters.onnx_runtime import load_bundle_model
    from exporters.model_store.registry import Registry

    registry_dir = tmp_path / "reg"
    result = _runner().invoke(app, ["export", str(run_dir), "--registry", str(registry_dir), "--variants", "int8",
                                    "--promote", "production"])
    assert result.exit_code == 0, result.stderr
    version = result.stdout.strip()
    assert version and "\n" not in version and " " not in version
    registry = Registry.open(str(registry_dir))
    assert registry.resolve("production") == version
    model, bundle = load_bundle_model(registry.fetch(version, tmp_path / "fetched"), prefer_gpu=False)
    assert set(bundle.variants) == {"fp32", "int8"} and bundle.parent_version is None
    assert model.path.name in {"model.onnx", "model_int8.onnx"}


def test_export_honours_the_s3_endpoint_variable_without_a_flag(run_dir, s3_bucket):
    from exporters.model_store.registry import Registry

    uri = s3_bucket.uri("models")
    result = _runner().invoke(app, ["export", str(run_dir), "--registry", uri, "--variants", "none"],
                              env={"CNNLOOP_S3_ENDPOINT_URL": s3_bucket.endpoint_url})
    assert result.exit_code == 0, result.stderr
    versions = Registry.open(uri, endpoint_url=s3_bucket.endpoint_url).list_versions()
    assert [r["version"] for r in versions] == [result.stdout.strip()]


def test_a_scheme_less_s3_endpoint_is_refused_with_exit_2_naming_the_setting(tmp_path):
    result = _runner().invoke(app, ["export", str(tmp_path), "--registry", "s3://bucket/models",
                                    "--s3-endpoint-url", "localhost:9000"])
    assert result.exit_code == 2
    assert "s3_endpoint_url" in result.stderr and "CNNLOOP_S3_ENDPOINT_URL" in result.stderr
    assert "exported model.onnx" not in result.stderr
