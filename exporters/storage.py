"""Byte storage under the registry and the service's log: a local directory or S3 (any S3 API).

Keys are '/'-separated and relative. Writes are atomic per object: a reader sees the old object
or the new one, never half of one. `list(prefix)` treats the prefix as a folder on both backends.
boto3/botocore load only when an s3:// URI is opened, so local use needs no AWS libraries.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urlparse

from exporters.errors import StorageError

# A local lock is held for the milliseconds of one read-compare-write; one older than this was
# left by a killed process and is broken, so a crash never wedges an alias forever.
STALE_LOCK_S = 30.0
LOCK_WAIT_S = 10.0


class Store(Protocol):
    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_if_absent(self, key: str, data: bytes) -> bool: ...
    def get_with_etag(self, key: str) -> tuple[bytes, str] | None: ...
    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def describe(self, key: str = "") -> str: ...


def check_key(key: str) -> str:
    parts = key.split("/") if isinstance(key, str) else [""]
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: keys are relative 'a/b/c' paths without '..' or empty parts")
    return key


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def describe(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.describe(key)} does not exist; check the path") from None
        except OSError as e:
            raise StorageError(f"cannot read {self.describe(key)}: {e}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            _write_atomically(self._path(key), data)
        except OSError as e:
            raise StorageError(f"cannot write {self.describe(key)}: {e}; check the path and its permissions") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                # link() fails when the name exists: create-if-absent, atomic, and the new name
                # appears with its full content (O_EXCL on the final name would expose a partial file).
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise StorageError(f"cannot write {self.describe(key)}: {e}; check the path and its permissions "
                               "(the directory must be on a filesystem with hard links)") from None

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        if not self._path(key).is_file():
            return None
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write only if the object still has `etag` (None: only if it is absent); False otherwise."""
        path = self._path(key)
        with self._locked(path):
            current = self.get_with_etag(key)
            if (current[1] if current else None) != etag:
                return False
            self.put_bytes(key, data)
            return True

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        lock = path.parent / f".{path.name}.lock"
        deadline = time.monotonic() + LOCK_WAIT_S
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                    break
                except FileExistsError:
                    try:
                        # Breaking races only if two writers find the same stale lock at the same
                        # moment, i.e. after a crash: rare enough for a file rewritten per promote.
                        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                            lock.unlink(missing_ok=True)
                            continue
                    except FileNotFoundError:
                        continue
                    if time.monotonic() > deadline:
                        raise StorageError(f"{lock} has been held for over {LOCK_WAIT_S:.0f}s; if no cnnloop "
                                           "process is writing this registry, delete the lock file") from None
                    time.sleep(random.uniform(0.001, 0.01))
        except OSError as e:
            raise StorageError(f"cannot lock {self.describe(str(path.relative_to(self.root)))}: {e}; "
                               "check the path and its permissions") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        # Dot names are our temp and lock files, never objects.
        return sorted(k for k in keys if not any(part.startswith(".") for part in k.split("/")))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {self.describe(key)}: {e}") from None


_loader_lock = threading.Lock()
_shared_loader = None


def _new_s3_client(endpoint_url: str | None):
    """An S3 client on a session of its own, with the standard AWS credential chain.

    Its own session: the process-wide default one is unsafe to create clients from several
    threads and pins the credentials it found first. This is what boto3.client() does, minus
    that default session; the loader of botocore's JSON models is shared, so a store opens in
    ~20 ms instead of ~90."""
    import botocore.session
    from botocore.config import Config

    global _shared_loader
    session = botocore.session.get_session()
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = session.get_component("data_loader")
    session.register_component("data_loader", _shared_loader)
    # Few, short retries: an unreachable endpoint should fail in seconds, not minutes.
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    try:
        return session.create_client("s3", endpoint_url=endpoint_url, config=config)
    except ValueError as e:  # botocore rejects a malformed endpoint URL here
        raise StorageError(f"invalid S3 endpoint URL {endpoint_url!r}: {e}; use http(s)://host:port") from None


def _s3_error_code(e: Exception) -> str:
    response = getattr(e, "response", None)  # ClientError's is a dict; requests' exceptions carry None
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class S3Store:
    """s3://bucket/prefix through botocore (boto3's engine), the standard credential chain, any endpoint URL."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url  # None: botocore reads AWS_ENDPOINT_URL itself, else AWS
        # Conditional PUTs (If-None-Match / If-Match) exist on AWS S3 since 2024, on recent MinIO
        # and in moto; a server answering 501 to them switches this store to the fallbacks below.
        self.conditional_writes = True
        self.client = _new_s3_client(endpoint_url)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str = "") -> str:
        path = self._key(key) if key else self.prefix
        where = f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"
        return where + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")

    def _error(self, e: Exception, key: str, action: str) -> StorageError:
        """One clear line for every way S3 can fail: never a botocore traceback."""
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, NoCredentialsError, ParamValidationError, PartialCredentialsError

        where = self.describe(key)
        if isinstance(e, StorageError):
            return e
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"no AWS credentials to {action} {where}: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an IAM role is attached")
        if isinstance(e, (HTTPClientError, BotoConnectionError)):
            return StorageError(f"S3 endpoint unreachable while trying to {action} {where}: {e}; check the endpoint "
                                "URL (--s3-endpoint-url / CNNLOOP_S3_ENDPOINT_URL, or AWS_ENDPOINT_URL), that the server runs, and the network")
        if isinstance(e, ParamValidationError):
            return StorageError(f"cannot {action} {where}: {e}; check the bucket name in the URI")
        if isinstance(e, ClientError):
            code = _s3_error_code(e)
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{where} does not exist; check the URI")
            if code == "NoSuchBucket":
                return StorageError(f"bucket '{self.bucket}' does not exist at {where}; create it or fix the URI")
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                        "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                return StorageError(f"access denied to {action} {where} ({code}); check the credentials "
                                    "(AWS_ACCESS_KEY_ID/AWS_PROFILE) and the bucket policy")
            return StorageError(f"S3 refused to {action} {where}: {code or e}")
        return StorageError(f"could not {action} {where}: {type(e).__name__}: {e}")

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as e:
            raise self._error(e, key, "read") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)  # one PUT: atomic
        except Exception as e:
            raise self._error(e, key, "write") from None

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        """PUT under a precondition; False when the precondition fails. Raises _Unsupported on 501."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except Exception as e:
            code = _s3_error_code(e)
            # 412: precondition failed; 409: a concurrent conditional write won; 404 under If-Match:
            # the object was deleted since we read it. All mean "someone else changed it".
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or (
                    code in ("NoSuchKey", "404") and "IfMatch" in condition):
                return False
            if code in ("NotImplemented", "501"):
                self.conditional_writes = False
                raise _Unsupported() from None
            raise self._error(e, key, "write") from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if self.conditional_writes:
            try:
                return self._conditional_put(key, data, IfNoneMatch="*")
            except _Unsupported:
                pass
        # Fallback for servers without conditional PUTs: check, then write. Two writers racing in
        # the gap both "win" and the later one's bytes stay; registry keys carry random ids, so
        # that race needs two publishers choosing the same id.
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read(), obj["ETag"]
        except Exception as e:
            if _s3_error_code(e) in ("NoSuchKey", "404"):
                return None
            raise self._error(e, key, "read") from None

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        if etag is None:
            return self.put_if_absent(key, data)
        if self.conditional_writes:
            try:
                return self._conditional_put(key, data, IfMatch=etag)
            except _Unsupported:
                pass
        # Fallback: last writer wins. Each PUT is still atomic, so readers see a valid object;
        # what can be lost is a concurrent writer's update (for an alias: one history entry).
        self.put_bytes(key, data)
        return True

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            if _s3_error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(e, key, "check") from None

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            full = self._key(prefix.rstrip("/")) + "/"
        else:
            full = self.prefix + "/" if self.prefix else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
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

    def download(self, key: str, dest: Path) -> str:
        """Stream an object to dest (atomically, size checked); returns its ETag."""
        part = None
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            dest.parent.mkdir(parents=True, exist_ok=True)
            # A part file of our own: several processes (DDP ranks) may fetch the same weights at once.
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            part = Path(name)
            with os.fdopen(fd, "wb") as f:
                for chunk in obj["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
            if part.stat().st_size != obj["ContentLength"]:
                raise StorageError(f"download of {self.describe(key)} was cut short ({part.stat().st_size} of "
                                   f"{obj['ContentLength']} bytes); try again")
            os.replace(part, dest)
            return obj["ETag"]
        except Exception as e:
            from botocore.exceptions import BotoCoreError

            if part is not None:
                part.unlink(missing_ok=True)
            # botocore's timeouts also subclass OSError (through requests), so ask for them first.
            if isinstance(e, OSError) and not isinstance(e, BotoCoreError):
                raise StorageError(f"cannot write {dest} while downloading {self.describe(key)}: {e}") from None
            raise self._error(e, key, "read") from None

    def etag_of(self, key: str) -> str:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"]
        except Exception as e:
            raise self._error(e, key, "read") from None


class _Unsupported(Exception):
    """The S3 server does not implement conditional PUTs."""


def check_store_uri(uri: str) -> str:
    """A settings validator's core: a local path or s3://bucket[/prefix], stripped; ValueError otherwise."""
    v = uri.strip()
    if not v:
        raise ValueError("must be a local path or s3://bucket/prefix, not empty")
    if v.startswith("s3://") and len(v) <= len("s3://"):
        raise ValueError(f"'{v}' names no bucket; use s3://bucket/prefix")
    if "://" in v and not v.startswith("s3://"):
        raise ValueError(f"'{v}': only local paths and s3:// URIs are supported")
    return v


def open_store(uri: str, *, endpoint_url: str | None = None) -> Store:
    """A local path (or file://path) or s3://bucket/prefix."""
    if not uri:
        raise StorageError("empty storage URI: give a local path or s3://bucket/prefix")
    parsed = urlparse(str(uri))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(Path(uri))


def fetch_to_local(uri: str, cache_dir: Path, *, endpoint_url: str | None = None) -> Path:
    """A local file as is, or an s3://bucket/key object downloaded into cache_dir.

    The copy is reused while the object's ETag is unchanged (one HEAD per call)."""
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3":
        path = Path(parsed.path if parsed.scheme == "file" else str(uri)).expanduser()
        if not path.is_file():
            raise StorageError(f"{path} does not exist or is not a file; pass an existing file or s3://bucket/key")
        return path
    key = parsed.path.lstrip("/")
    if not parsed.netloc or not key or key.endswith("/"):
        raise StorageError(f"{uri!r} names no object: use s3://bucket/path/file.pth")
    store = S3Store(parsed.netloc, "", endpoint_url)
    dest = Path(cache_dir) / hashlib.sha256(str(uri).encode()).hexdigest()[:16] / Path(key).name
    etag_file = dest.with_name(f".{dest.name}.etag")
    etag = store.etag_of(key)
    if dest.is_file() and etag_file.is_file() and etag_file.read_text() == etag:
        return dest
    try:
        etag_file.unlink(missing_ok=True)
        etag_file.parent.mkdir(parents=True, exist_ok=True)
        etag_file.write_text(store.download(key, dest))
    except OSError as e:
        raise StorageError(f"cannot cache {uri} under {cache_dir}: {e}; check that the folder is writable") from None
    return dest
