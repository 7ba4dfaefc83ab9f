"""Registry on both backends: a local directory and a real S3 HTTP endpoint (moto server)."""
import json
import threading

import boto3
import pytest
from typer.testing import CliRunner

from exporters.errors import RegistryError, StorageError
from exporters.registry import Registry
from exporters.storage import fetch_to_local, open_store
from tests.s3_server import free_port
from training.cli import app


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry.open(str(tmp_path / "reg")), None
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return Registry.open(f"s3://{bucket}/models", endpoint_url=endpoint), (endpoint, bucket)


@pytest.fixture
def bundle(tmp_path):
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"\x08\x01fake-onnx-bytes" * 100)
    (d / "reference.npz").write_bytes(b"numbers")
    return d


def _corrupt(reg: Registry, s3, key: str):
    if s3 is None:
        path = reg.store.root / key
        data = bytearray(path.read_bytes())
        data[5] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        endpoint, bucket = s3
        boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=f"models/{key}", Body=b"tampered")


def test_publish_then_show_lists_files_with_checksums(registry, bundle):
    reg, _ = registry
    v = reg.publish(bundle, {"labels": ["a", "b"]})
    meta = reg.show(v)
    assert meta["labels"] == ["a", "b"] and meta["version"] == v
    assert set(meta["files"]) == {"model.onnx", "reference.npz"} and len(meta["files"]["model.onnx"]["sha256"]) == 64
    assert [r["version"] for r in reg.list_versions()] == [v]


def test_fetch_returns_verified_identical_files(registry, bundle, tmp_path):
    reg, _ = registry
    v = reg.publish(bundle, {})
    got = reg.fetch(v, tmp_path / "cache")
    assert (got / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert json.loads((got / "bundle.json").read_text())["version"] == v


def test_tampered_object_is_refused_and_nothing_is_left_behind(registry, bundle, tmp_path):
    reg, s3 = registry
    v = reg.publish(bundle, {})
    _corrupt(reg, s3, f"versions/{v}/model.onnx")
    with pytest.raises(RegistryError, match="model.onnx fails verification"):
        reg.fetch(v, tmp_path / "cache")
    assert not (tmp_path / "cache" / v).exists()
    assert not [p for p in (tmp_path / "cache").iterdir()]


def test_incomplete_upload_is_not_listed_and_not_promotable(registry, bundle):
    reg, _ = registry
    reg.store.put_bytes("versions/v20260101-000000-abcdef/model.onnx", b"half")
    assert reg.list_versions() == []
    with pytest.raises(RegistryError, match="incomplete"):
        reg.promote("v20260101-000000-abcdef")


def test_versions_are_immutable(registry, bundle):
    reg, _ = registry
    v = reg.publish(bundle, {})
    assert reg.store.put_if_absent(f"versions/{v}/bundle.json", b"{}") is False
    assert reg.show(v)["version"] == v


def test_promote_then_rollback_moves_production_back(registry, bundle):
    reg, _ = registry
    v1, v2 = reg.publish(bundle, {}), reg.publish(bundle, {})
    reg.promote(v1)
    reg.promote(v2)
    assert reg.resolve("production") == v2
    assert reg.rollback()["version"] == v1
    assert reg.resolve("production") == v1
    with pytest.raises(RegistryError, match="no previous version"):
        reg.rollback()


def test_candidate_alias_is_independent_of_production(registry, bundle):
    reg, _ = registry
    v1, v2 = reg.publish(bundle, {}), reg.publish(bundle, {})
    reg.promote(v1)
    reg.promote(v2, "candidate")
    assert (reg.resolve("production"), reg.resolve("candidate")) == (v1, v2)


def test_concurrent_promotes_leave_a_valid_alias(registry, bundle):
    reg, _ = registry
    versions = [reg.publish(bundle, {}) for _ in range(4)]
    other = Registry(reg.store.__class__.__new__(reg.store.__class__))
    other.store.__dict__.update(reg.store.__dict__)  # a second client: no shared in-process lock
    threads = [threading.Thread(target=(reg if i % 2 else other).promote, args=(v,)) for i, v in enumerate(versions * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.resolve("production") in versions
    assert set(reg.alias_history("production")) <= set(versions)


@pytest.mark.parametrize("bad", ["../etc", "v1/../../x", "/abs", "", "v20260101-000000-ABCDEF"])
def test_path_traversal_and_malformed_version_ids_are_refused(registry, bad):
    reg, _ = registry
    with pytest.raises(RegistryError, match="invalid version id"):
        reg.show(bad)


def test_storage_keys_with_traversal_are_refused(tmp_path):
    store = open_store(str(tmp_path))
    for key in ("../x", "a/../../b", "/abs", "a//b", "a\\b"):
        with pytest.raises(StorageError, match="invalid storage key"):
            store.put_bytes(key, b"x")


def test_unknown_alias_is_refused(registry):
    reg, _ = registry
    with pytest.raises(RegistryError, match="unknown alias"):
        reg.resolve("staging")


def test_unreachable_s3_endpoint_is_a_storage_error_naming_it():
    reg = Registry.open("s3://nowhere/models", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="unreachable"):
        reg.list_versions()


def test_weights_fetch_from_s3_downloads_the_object(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key="w/net.pth", Body=b"weights")
    import os

    os.environ["AWS_ENDPOINT_URL"] = endpoint  # boto3 reads it: how users point at MinIO & co.
    try:
        path = fetch_to_local(f"s3://{bucket}/w/net.pth", tmp_path)
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    assert path.read_bytes() == b"weights" and path.name == "net.pth"


def test_weights_fetch_of_a_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        fetch_to_local(str(tmp_path / "none.pth"), tmp_path)


runner = CliRunner()


def test_cli_promote_list_rollback_round_trip(tmp_path, bundle):
    reg = Registry.open(str(tmp_path / "reg"))
    v1, v2 = reg.publish(bundle, {}), reg.publish(bundle, {})
    args = ["--registry", str(tmp_path / "reg")]
    assert runner.invoke(app, ["registry", "promote", v1, *args]).exit_code == 0
    assert runner.invoke(app, ["registry", "promote", v2, *args]).exit_code == 0
    listed = json.loads(runner.invoke(app, ["registry", "list", *args, "--json"]).stdout)
    assert [r["aliases"] for r in listed] == [[], ["production"]]
    out = runner.invoke(app, ["registry", "rollback", *args, "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["version"] == v1


def test_cli_unknown_version_exits_2(tmp_path, bundle):
    Registry.open(str(tmp_path / "reg")).publish(bundle, {})
    res = runner.invoke(app, ["registry", "show", "v20200101-000000-000000", "--registry", str(tmp_path / "reg")])
    assert res.exit_code == 2 and "unknown version" in res.output


def test_cli_unreachable_registry_exits_3():
    res = runner.invoke(app, ["registry", "list", "--registry", "s3://nowhere/x", "--endpoint-url", f"http://127.0.0.1:{free_port()}"],
                        env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    assert res.exit_code == 3 and "unreachable" in res.output
