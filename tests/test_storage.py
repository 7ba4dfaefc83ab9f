"""Storage on both backends: a local directory and a real S3 HTTP endpoint (moto server)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from exporters.errors import StorageError
from exporters.storage import STALE_LOCK_S, LocalStore, S3Store, fetch_to_local, open_store
from tests.s3_server import free_port


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup either
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _set_moto_auth(endpoint: str, count: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()


@pytest.fixture
def moto_checks_credentials(s3_bucket):
    """moto's own switch: from now on it rejects access keys it never issued (ours are dummies)."""
    _set_moto_auth(s3_bucket.endpoint_url, "0")
    try:
        yield s3_bucket
    finally:
        _set_moto_auth(s3_bucket.endpoint_url, "inf")


# --- the Store contract, on both backends ---------------------------------------------------------

def test_put_then_get_returns_the_same_bytes(store):
    store.put_bytes("a/b.bin", b"\x00payload\xff")
    assert store.get_bytes("a/b.bin") == b"\x00payload\xff"


def test_put_bytes_replaces_an_existing_object_whole(store):
    store.put_bytes("k", b"old and longer")
    store.put_bytes("k", b"new")
    assert store.get_bytes("k") == b"new"


def test_get_of_a_missing_key_is_a_storage_error_naming_it(store):
    with pytest.raises(StorageError, match="nothing/here.*does not exist"):
        store.get_bytes("nothing/here")


def test_put_if_absent_writes_only_the_first_time(store):
    assert store.put_if_absent("once", b"first") is True
    assert store.put_if_absent("once", b"second") is False
    assert store.get_bytes("once") == b"first"


def test_put_if_match_refuses_a_stale_etag(store):
    store.put_bytes("alias", b"v1")
    _, etag = store.get_with_etag("alias")
    store.put_bytes("alias", b"v2")
    assert store.put_if_match("alias", b"v3", etag) is False
    assert store.get_bytes("alias") == b"v2"


def test_put_if_match_accepts_the_current_etag(store):
    store.put_bytes("alias", b"v1")
    _, etag = store.get_with_etag("alias")
    assert store.put_if_match("alias", b"v2", etag) is True
    assert store.get_bytes("alias") == b"v2"


def test_put_if_match_without_etag_only_creates(store):
    assert store.put_if_match("alias", b"v1", None) is True
    assert store.put_if_match("alias", b"v2", None) is False


def test_get_with_etag_of_a_missing_key_is_none(store):
    assert store.get_with_etag("nope") is None


def test_exists_tells_present_from_absent(store):
    store.put_bytes("here", b"x")
    assert (store.exists("here"), store.exists("gone")) == (True, False)


def test_list_treats_the_prefix_as_a_folder(store):
    for key in ("a/x", "a/y/z", "ab/w", "top"):
        store.put_bytes(key, b".")
    assert store.list("a") == ["a/x", "a/y/z"]
    assert store.list() == ["a/x", "a/y/z", "ab/w", "top"]


def test_list_of_a_missing_prefix_is_empty(store):
    assert store.list("never/written") == []


def test_delete_removes_the_object_and_tolerates_a_missing_one(store):
    store.put_bytes("k", b"x")
    store.delete("k")
    store.delete("k")
    assert not store.exists("k")


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/abs", "a//b", "a\\b", "", "./a"])
def test_keys_that_could_escape_the_store_are_refused(store, key):
    with pytest.raises(StorageError, match="invalid storage key"):
        store.put_bytes(key, b"x")


# --- local specifics ------------------------------------------------------------------------------

def test_local_writes_leave_no_temp_or_lock_files(tmp_path):
    store = open_store(str(tmp_path))
    store.put_bytes("d/a", b"1")
    store.put_if_absent("d/b", b"2")
    store.put_if_match("d/c", b"3", None)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a", "b", "c"]


def test_local_put_if_absent_from_many_threads_has_one_winner(tmp_path):
    store = open_store(str(tmp_path))
    wins: list[int] = []
    threads = [threading.Thread(target=lambda i=i: store.put_if_absent("k", str(i).encode()) and wins.append(i))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.get_bytes("k") == str(wins[0]).encode()


def test_stale_local_lock_left_by_a_dead_writer_is_broken(tmp_path):
    store = open_store(str(tmp_path))
    store.put_bytes("aliases/p.json", b"v1")
    lock = tmp_path / "aliases" / ".p.json.lock"
    lock.touch()
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert store.put_if_match("aliases/p.json", b"v2", store.get_with_etag("aliases/p.json")[1]) is True
    assert not lock.exists()


def test_file_uri_opens_a_local_store(tmp_path):
    store = open_store(f"file://{tmp_path}")
    assert isinstance(store, LocalStore) and store.root == tmp_path.resolve()


def test_unknown_uri_scheme_is_refused():
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")


def test_opening_a_local_store_does_not_import_boto3(tmp_path):
    code = ("import sys; from exporters.storage import open_store; open_store(sys.argv[1]).list(); "
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


# --- S3 failures: one clear StorageError each -----------------------------------------------------

def test_s3_describe_names_bucket_prefix_and_endpoint(s3_bucket):
    store = open_store(s3_bucket.uri("models"), endpoint_url=s3_bucket.endpoint_url)
    assert store.describe("a.json") == f"s3://{s3_bucket.name}/models/a.json (endpoint {s3_bucket.endpoint_url})"


def test_unreachable_s3_endpoint_is_a_storage_error_saying_so(s3_bucket):
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = open_store(s3_bucket.uri("x"), endpoint_url=endpoint)
    with pytest.raises(StorageError, match=f"unreachable.*{endpoint}.*check the endpoint URL"):
        store.get_bytes("k")


def test_missing_bucket_is_a_storage_error_naming_it(s3_bucket):
    store = open_store("s3://no-such-bucket-here/x", endpoint_url=s3_bucket.endpoint_url)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        store.list()


def test_missing_credentials_is_a_storage_error_saying_how_to_set_them(s3_endpoint, no_aws_credentials):
    store = open_store("s3://any-bucket/x", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="no AWS credentials.*AWS_ACCESS_KEY_ID"):
        store.list()


def test_rejected_credentials_are_a_storage_error_saying_access_denied(moto_checks_credentials):
    bucket = moto_checks_credentials
    store = open_store(bucket.uri("x"), endpoint_url=bucket.endpoint_url)
    with pytest.raises(StorageError, match="access denied to read"):
        store.get_bytes("k")


def test_aws_endpoint_url_from_the_environment_is_honoured(s3_bucket, monkeypatch):
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="x/k", Body=b"via env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint_url)
    assert open_store(s3_bucket.uri("x")).get_bytes("k") == b"via env"


# --- fetch_to_local: what `--weights s3://...` uses ------------------------------------------------

def test_fetch_to_local_downloads_an_s3_object_into_the_cache(s3_bucket, tmp_path):
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="w/net.pth", Body=b"weights")
    path = fetch_to_local(s3_bucket.uri("w/net.pth"), tmp_path / "cache", endpoint_url=s3_bucket.endpoint_url)
    assert path.name == "net.pth" and path.read_bytes() == b"weights"
    assert tmp_path / "cache" in path.parents


def test_fetch_to_local_reuses_the_cached_copy_while_the_object_is_unchanged(s3_bucket, tmp_path):
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="net.pth", Body=b"weights")
    first = fetch_to_local(s3_bucket.uri("net.pth"), tmp_path, endpoint_url=s3_bucket.endpoint_url)
    stamp = first.stat().st_mtime_ns
    again = fetch_to_local(s3_bucket.uri("net.pth"), tmp_path, endpoint_url=s3_bucket.endpoint_url)
    assert again == first and again.stat().st_mtime_ns == stamp


def test_fetch_to_local_downloads_again_when_the_object_changed(s3_bucket, tmp_path):
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="net.pth", Body=b"weights v1")
    fetch_to_local(s3_bucket.uri("net.pth"), tmp_path, endpoint_url=s3_bucket.endpoint_url)
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="net.pth", Body=b"weights v2")
    path = fetch_to_local(s3_bucket.uri("net.pth"), tmp_path, endpoint_url=s3_bucket.endpoint_url)
    assert path.read_bytes() == b"weights v2"


def test_fetch_to_local_of_a_missing_s3_object_names_it(s3_bucket, tmp_path):
    with pytest.raises(StorageError, match=f"s3://{s3_bucket.name}/w/none.pth.*does not exist"):
        fetch_to_local(s3_bucket.uri("w/none.pth"), tmp_path, endpoint_url=s3_bucket.endpoint_url)


def test_fetch_to_local_returns_a_local_file_as_it_is(tmp_path):
    weights = tmp_path / "net.pth"
    weights.write_bytes(b"w")
    assert fetch_to_local(str(weights), tmp_path / "cache") == weights


def test_fetch_to_local_of_a_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(StorageError, match=f"{tmp_path / 'none.pth'} does not exist"):
        fetch_to_local(str(tmp_path / "none.pth"), tmp_path)


def test_fetch_to_local_of_a_bucket_without_a_key_is_refused(tmp_path):
    with pytest.raises(StorageError, match="names no object"):
        fetch_to_local("s3://bucket-only/", tmp_path)


def test_s3_conditional_writes_use_server_preconditions_not_the_fallback(s3_bucket):
    store = open_store(s3_bucket.uri(), endpoint_url=s3_bucket.endpoint_url)
    store.put_if_absent("k", b"1")
    store.put_if_absent("k", b"2")
    assert isinstance(store, S3Store) and store.conditional_writes is True
