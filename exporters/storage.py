"""Byte storage under the registry and the service's log: a local directory or S3 (any S3 API).

Keys are '/'-separated and relative. Writes are atomic per object: a reader sees the old object
or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from exporters.errors import StorageError


class Store(Protocol):
    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_if_absent(self, key: str, data: bytes) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def describe(self, key: str = "") -> str: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: keys are relative 'a/b/c' paths without '..' or empty parts")
    return key


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.describe(key)} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {self.describe(key)}: {e}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"cannot write {self.describe(key)}: {e}; check the path and its permissions") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # link() fails if the name exists: create-if-absent, atomically, full content
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store:
    """s3://bucket/prefix through boto3 with the standard credential chain and any endpoint URL."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        # Few, short retries: an unreachable endpoint should fail in seconds, not minutes.
        cfg = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str = "") -> str:
        where = f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"
        return where + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")

    def _error(self, e: Exception, key: str, action: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.describe(key)
        if isinstance(e, NoCredentialsError):
            return StorageError(f"no AWS credentials to {action} {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
        if isinstance(e, EndpointConnectionError) or "Could not connect" in str(e) or "Connect timeout" in str(e):
            return StorageError(f"S3 endpoint unreachable while trying to {action} {where}: {e}; check the endpoint URL and network")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{where} does not exist")
            if code == "NoSuchBucket":
                return StorageError(f"bucket '{self.bucket}' does not exist; create it or fix the registry URI")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"access denied to {action} {where} ({code}); check the credentials and bucket policy")
            return StorageError(f"S3 refused to {action} {where}: {code} {e}")
        return StorageError(f"could not {action} {where}: {e}")

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:
            raise self._error(e, key, "read") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            raise self._error(e, key, "write") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._error(e, key, "write") from None
        except Exception as e:
            raise self._error(e, key, "write") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(e, key, "check") from None
        except Exception as e:
            raise self._error(e, key, "check") from None

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out += [o["Key"][strip:] for o in page.get("Contents", [])]
        except Exception as e:
            raise self._error(e, prefix, "list") from None
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._error(e, key, "delete") from None


def open_store(uri: str, *, endpoint_url: str | None = None) -> Store:
    """A local path (or file://) or s3://bucket/prefix."""
    if not uri:
        raise StorageError("empty storage URI: give a local path or s3://bucket/prefix")
    parsed = urlparse(str(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(Path(uri))


def fetch_to_local(uri: str, cache_dir: Path, *, endpoint_url: str | None = None) -> Path:
    """A local path as is, or an s3://bucket/key object downloaded into cache_dir (by URI hash)."""
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3":
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        if not path.is_file():
            raise StorageError(f"{path} does not exist; pass an existing file")
        return path
    bucket, _, key = parsed.path.lstrip("/").rpartition("/")
    store = S3Store(parsed.netloc, bucket, endpoint_url)
    data = store.get_bytes(key)
    dest = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(key).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest
