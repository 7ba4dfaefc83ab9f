"""Model registry: immutable versions and movable aliases over a Store (local dir or S3).

Layout under the registry root:
  versions/<id>/<file>...      bundle files, uploaded first
  versions/<id>/bundle.json    metadata + sha256/size of every file, written LAST: its presence
                               marks a complete version; an upload that died before it is ignored
  aliases/<alias>.json         {"version", "history": [older versions, newest first], "updated_at"}
  events/<time>-<rand>.json    promote/rollback audit trail, one object per event
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from exporters.errors import RegistryError, StorageError
from exporters.storage import Store, open_store

ALIASES = ("production", "candidate")
BUNDLE_JSON = "bundle.json"
_VERSION_RE = re.compile(r"^v\d{8}-\d{6}-[0-9a-f]{6}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_version_id(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise RegistryError(f"invalid version id {version!r}: ids look like v20261124-120501-3f2a9c (see `cnnloop registry list`)")
    return version


def check_alias(alias: str) -> str:
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")
    return alias


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _FILE_RE.match(name) or ".." in name:
        raise RegistryError(f"invalid bundle file name {name!r}: plain names like model.onnx only (no paths, no '..')")
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_version_id() -> str:
    # UTC time sorts; the random suffix keeps two publishers in the same second apart.
    return "v" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class Registry:
    def __init__(self, store: Store):
        self.store = store
        self._alias_lock = threading.Lock()

    @classmethod
    def open(cls, uri: str, *, endpoint_url: str | None = None) -> "Registry":
        return cls(open_store(uri, endpoint_url=endpoint_url))

    def describe(self) -> str:
        return self.store.describe()

    # versions ---------------------------------------------------------------------------------
    def publish(self, bundle_dir: Path, metadata: dict) -> str:
        """Upload every file of bundle_dir as a new immutable version; returns its id."""
        bundle_dir = Path(bundle_dir)
        files = sorted(p for p in bundle_dir.iterdir() if p.is_file() and p.name != BUNDLE_JSON)
        if not files:
            raise RegistryError(f"{bundle_dir} holds no files to publish")
        version = new_version_id()
        if self.store.exists(f"versions/{version}/{BUNDLE_JSON}"):
            raise RegistryError(f"version {version} already exists; versions are immutable")
        manifest = {}
        for p in files:
            check_file_name(p.name)
            data = p.read_bytes()
            self.store.put_bytes(f"versions/{version}/{p.name}", data)
            manifest[p.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        doc = {**metadata, "version": version, "files": manifest, "created_at": _now()}
        if not self.store.put_if_absent(f"versions/{version}/{BUNDLE_JSON}", json.dumps(doc, indent=2, default=str).encode()):
            raise RegistryError(f"version {version} already exists; versions are immutable")
        return version

    def _version_ids(self) -> list[str]:
        ids = set()
        for key in self.store.list("versions"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == BUNDLE_JSON and _VERSION_RE.match(parts[1]):
                ids.add(parts[1])
        return sorted(ids)

    def show(self, version: str) -> dict:
        check_version_id(version)
        try:
            return json.loads(self.store.get_bytes(f"versions/{version}/{BUNDLE_JSON}"))
        except StorageError:
            if self.store.list(f"versions/{version}"):
                raise RegistryError(f"version {version} is incomplete (its upload never finished); publish again") from None
            known = self._version_ids()[-5:]
            raise RegistryError(
                f"unknown version {version} in {self.describe()}; newest known: {', '.join(known) or 'none'}"
            ) from None
        except json.JSONDecodeError:
            raise RegistryError(f"version {version}: {BUNDLE_JSON} is corrupt") from None

    def list_versions(self) -> list[dict]:
        aliases = {a: self.resolve(a) for a in ALIASES}
        out = []
        for v in self._version_ids():
            meta = self.show(v)
            out.append({
                "version": v, "created_at": meta.get("created_at"),
                "aliases": [a for a, target in aliases.items() if target == v],
                "backbone": (meta.get("backbone") or {}).get("name") if isinstance(meta.get("backbone"), dict) else meta.get("backbone"),
                "val_accuracy": ((meta.get("metrics") or {}).get("val") or {}).get("accuracy"),
                "parent": meta.get("parent_version"),
            })
        return out

    def resolve_ref(self, ref: str) -> str:
        """A version id or an alias name -> version id."""
        if ref in ALIASES:
            v = self.resolve(ref)
            if v is None:
                raise RegistryError(f"alias '{ref}' points at no version yet; promote one with `cnnloop registry promote VERSION`")
            return v
        return check_version_id(ref)

    def fetch(self, ref: str, dest_dir: Path) -> Path:
        """Download a version to dest_dir/<id>, verifying every file; never leaves a half-written copy."""
        version = self.resolve_ref(ref)
        meta = self.show(version)
        dest = Path(dest_dir) / version
        if dest.is_dir() and self._verify_local(dest, meta) is None:
            return dest
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest_dir))
        try:
            for name, want in meta.get("files", {}).items():
                check_file_name(name)
                try:
                    data = self.store.get_bytes(f"versions/{version}/{name}")
                except StorageError as e:
                    raise RegistryError(f"version {version} is missing {name} ({e}); the bundle is refused") from None
                got = hashlib.sha256(data).hexdigest()
                if len(data) != want["size"] or got != want["sha256"]:
                    raise RegistryError(
                        f"version {version}: {name} fails verification (expected sha256 {want['sha256'][:12]}... "
                        f"size {want['size']}, got {got[:12]}... size {len(data)}); the bundle is corrupt or tampered, refused"
                    )
                (tmp / name).write_bytes(data)
            (tmp / BUNDLE_JSON).write_text(json.dumps(meta, indent=2))
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    @staticmethod
    def _verify_local(path: Path, meta: dict) -> str | None:
        """None when every file matches the manifest, else what is wrong."""
        for name, want in meta.get("files", {}).items():
            p = path / name
            if not p.is_file() or p.stat().st_size != want["size"] or sha256_file(p) != want["sha256"]:
                return f"{name} differs"
        return None

    # aliases ----------------------------------------------------------------------------------
    def _read_alias(self, alias: str) -> dict | None:
        check_alias(alias)
        try:
            return json.loads(self.store.get_bytes(f"aliases/{alias}.json"))
        except StorageError:
            if self.store.exists(f"aliases/{alias}.json"):
                raise
            return None

    def resolve(self, alias: str) -> str | None:
        doc = self._read_alias(alias)
        return doc["version"] if doc else None

    def alias_history(self, alias: str) -> list[str]:
        doc = self._read_alias(alias)
        return doc.get("history", []) if doc else []

    def _write_alias(self, alias: str, version: str, history: list[str], event: str) -> None:
        doc = {"version": version, "history": history[:50], "updated_at": _now()}
        # One object, one atomic PUT/replace: any reader sees a whole, valid alias. Two concurrent
        # writers from different processes resolve last-writer-wins (both states are valid);
        # the in-process lock keeps one service's threads from interleaving read-modify-write.
        self.store.put_bytes(f"aliases/{alias}.json", json.dumps(doc).encode())
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.store.put_bytes(f"events/{stamp}-{secrets.token_hex(4)}.json",
                             json.dumps({"event": event, "alias": alias, "version": version, "at": _now()}).encode())

    def promote(self, version: str, alias: str = "production") -> dict:
        check_alias(alias)
        meta = self.show(check_version_id(version))  # refuses unknown and incomplete versions
        with self._alias_lock:
            doc = self._read_alias(alias)
            previous = doc["version"] if doc else None
            if previous == version:
                return {"alias": alias, "version": version, "previous": previous, "changed": False}
            history = ([previous] + doc.get("history", [])) if previous else []
            self._write_alias(alias, meta["version"], history, "promote")
        return {"alias": alias, "version": version, "previous": previous, "changed": True}

    def rollback(self, alias: str = "production") -> dict:
        with self._alias_lock:
            doc = self._read_alias(alias)
            if not doc or not doc.get("history"):
                raise RegistryError(f"alias '{alias}' has no previous version to roll back to")
            target, rest = doc["history"][0], doc["history"][1:]
            self._write_alias(alias, target, rest, "rollback")
        return {"alias": alias, "version": target, "previous": doc["version"], "changed": True}
