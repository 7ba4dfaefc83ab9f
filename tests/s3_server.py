"""A real S3 HTTP endpoint for tests: moto's ThreadedMotoServer on a free loopback port.

One server per test session (starting one costs ~0.5 s); every test gets its own fresh bucket and
dummy credentials, so tests never see each other's objects and never reach AWS."""
from __future__ import annotations

import socket
import uuid
from typing import Iterator, NamedTuple

import pytest


class S3Bucket(NamedTuple):
    endpoint_url: str
    name: str

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url)


def free_port() -> int:
    """A loopback port nothing listens on (once the probe socket closes): also our 'unreachable' endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh, empty bucket on the session's moto server, with dummy credentials in the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    bucket = S3Bucket(s3_endpoint, f"cnnloop-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests against a local directory store and a real S3 endpoint."""
    from exporters.storage import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return open_store(bucket.uri("data"), endpoint_url=bucket.endpoint_url)
