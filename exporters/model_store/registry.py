"""Model registry: immutable versions and movable aliases over a Store (local dir or S3).

Layout under the registry root:
  versions/<id>/<file>...      bundle files, uploaded first, each create-if-absent
  versions/<id>/bundle.json    metadata + sha256/size of every file, written LAST: its presence
                               marks a complete version; an upload that died before it is skipped
  aliases/<alias>.json         {"version", "history": [older versions, newest first], "updated_at"},
                               one object replaced whole, so a reader always sees a valid alias
  events/<time>-<rand>.json    promote/rollback audit trail, one object per event
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from exporters.model_store.bundle import BUNDLE_JSON
from exporters.errors import AliasMoved, RegistryError, StorageError
from exporters.storage import Store, open_store

ALIASES = ("production", "candidate")
# Enough to roll back through a bad week of hourly retrains; keeps the alias object small.
HISTORY_LIMIT = 50
ALIAS_WRITE_ATTEMPTS = 50
_VERSION_RE = re.compile(r"^v\d{8}-\d{6}-[0-9a-f]{6}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _now() -> str:
    # Microseconds: versions made in the same second still list in the order they were published.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_version_id() -> str:
    # UTC time sorts; the random suffix keeps two publishers in the same second apart.
    return "v" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_version_id(version: str) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise RegistryError(f"invalid version id {version!r}: ids look like v20261124-120501-3f2a9c "
                            "(see `cnnloop registry list`)")
    return version


def check_alias(alias: str) -> str:
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")
    return alias


def check_file_name(name: str) -> str:
    # The regex admits no '/', '\\' or leading '.', so no name can leave its version folder.
    if not isinstance(name, str) or not _FILE_RE.match(name) or ".." in name:
        raise RegistryError(f"invalid bundle file name {name!r}: plain names like model.onnx only (no paths, no '..')")
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_files(meta: dict) -> dict[str, dict]:
    """The `files` table of a bundle.json, checked: every name safe, every entry a sha256 and a size."""
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise RegistryError(f"version {meta.get('version')}: {BUNDLE_JSON} lists no files; the bundle is corrupt")
    for name, want in files.items():
        check_file_name(name)
        if (not isinstance(want, dict) or not _SHA256_RE.match(str(want.get("sha256")))
                or not isinstance(want.get("size"), int) or want["size"] < 0):
            raise RegistryError(f"version {meta.get('version')}: {BUNDLE_JSON} has a malformed entry for {name}")
    return files


def local_copy_problem(path: Path, manifest: bytes, meta: dict) -> str | None:
    """None when path holds exactly this version (bundle.json byte for byte, every file's size
    and sha256, nothing else), else what differs."""
    files = manifest_files(meta)
    present = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if present != set(files) | {BUNDLE_JSON}:
        return f"holds {sorted(present)}, expected {sorted(set(files) | {BUNDLE_JSON})}"
    try:
        if (path / BUNDLE_JSON).read_bytes() != manifest:
            return f"{BUNDLE_JSON} differs from the registry's"
        for name, want in files.items():
            p = path / name
            if not p.is_file() or p.stat().st_size != want["size"] or sha256_file(p) != want["sha256"]:
                return f"{name} differs"
    except OSError as e:
        return f"unreadable: {e}"
    return None


class Registry:
    def __init__(self, store: Store):
        self.store = store

    @classmethod
    def open(cls, uri: str, *, endpoint_url: str | None = None) -> "Registry":
        return cls(open_store(uri, endpoint_url=endpoint_url))

    def describe(self) -> str:
        return self.store.describe()

    # versions ---------------------------------------------------------------------------------
    def publish(self, bundle_dir: Path, metadata: dict, *, version: str | None = None) -> str:
        """Upload every file of bundle_dir as a new immutable version; returns its id.

        `version` names the id explicitly (tests, migrations); by default a fresh one is made.
        A bundle.json already in bundle_dir (a fetched copy) is replaced by the registry's own."""
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise RegistryError(f"bundle folder {bundle_dir} does not exist; export a bundle first")
        if not isinstance(metadata, dict):
            raise RegistryError(f"bundle metadata must be a dict, not {type(metadata).__name__}")
        # Dot files (.DS_Store, editor droppings) are never part of a bundle.
        entries = sorted(p for p in bundle_dir.iterdir() if not p.name.startswith("."))
        if subdirs := [p.name for p in entries if not p.is_file()]:
            raise RegistryError(f"{bundle_dir} holds folders {subdirs}; a bundle is a flat folder of files")
        files = [p for p in entries if p.name != BUNDLE_JSON]
        if not files:
            raise RegistryError(f"{bundle_dir} holds no files to publish")
        for p in files:
            check_file_name(p.name)
        version = check_version_id(version) if version is not None else new_version_id()
        if self.store.list(f"versions/{version}"):
            raise RegistryError(f"version {version} already exists in {self.describe()}; versions are immutable, "
                                "publish a new one")
        manifest = {}
        for p in files:
            data = p.read_bytes()
            if not self.store.put_if_absent(f"versions/{version}/{p.name}", data):
                raise RegistryError(f"version {version} is being written by someone else; versions are immutable")
            manifest[p.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        # Registry-owned fields win over the caller's: they describe what was actually stored.
        doc = {**metadata, "version": version, "files": manifest, "created_at": _now()}
        body = json.dumps(doc, indent=2, default=str).encode()
        if not self.store.put_if_absent(f"versions/{version}/{BUNDLE_JSON}", body):
            raise RegistryError(f"version {version} already exists in {self.describe()}; versions are immutable")
        return version

    def _complete_version_ids(self) -> list[str]:
        ids = set()
        for key in self.store.list("versions"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == BUNDLE_JSON and _VERSION_RE.match(parts[1]):
                ids.add(parts[1])
        return sorted(ids)

    def show(self, version: str) -> dict:
        """The full bundle.json of a complete version."""
        return self._read_manifest(version)[1]

    def _read_manifest(self, version: str) -> tuple[bytes, dict]:
        """bundle.json of a complete version, as stored and parsed."""
        check_version_id(version)
        key = f"versions/{version}/{BUNDLE_JSON}"
        try:
            raw = self.store.get_bytes(key)
        except StorageError:
            if self.store.exists(key):
                raise  # present but unreadable: the storage error says why
            if self.store.list(f"versions/{version}"):
                raise RegistryError(f"version {version} is incomplete (its upload never finished); "
                                    "publish the bundle again as a new version") from None
            known = self._complete_version_ids()[-5:]
            raise RegistryError(f"unknown version {version} in {self.describe()}; newest known: "
                                f"{', '.join(known) or 'none'} (see `cnnloop registry list`)") from None
        try:
            meta = json.loads(raw)
        except ValueError:
            raise RegistryError(f"version {version}: {BUNDLE_JSON} is not valid JSON; the version is corrupt") from None
        if not isinstance(meta, dict) or meta.get("version") != version:
            raise RegistryError(f"version {version}: {BUNDLE_JSON} describes {meta.get('version') if isinstance(meta, dict) else meta!r}; "
                                "the version was tampered with, refused")
        return raw, meta

    def list_versions(self) -> list[dict]:
        """Every complete version, oldest first, with its aliases and headline metadata."""
        aliases = {a: self.resolve(a) for a in ALIASES}
        ids = self._complete_version_ids()

        def row(v: str) -> dict:
            try:
                meta = self.show(v)
            except RegistryError as e:  # one corrupt version must not hide the others
                return {"version": v, "created_at": None, "aliases": [], "error": str(e)}
            backbone = meta.get("backbone")
            variants = meta.get("variants")
            return {
                "version": v,
                "created_at": meta.get("created_at"),
                "aliases": [a for a, target in aliases.items() if target == v],
                "backbone": backbone.get("name") if isinstance(backbone, dict) else backbone,
                "metrics": meta.get("metrics"),
                "parent_version": meta.get("parent_version"),
                "variants": [n for n, e in variants.items() if not (isinstance(e, dict) and e.get("refused"))]
                if isinstance(variants, dict) else None,
            }

        # One GET per version: in parallel, a few hundred S3 versions list in a second or two.
        with ThreadPoolExecutor(max_workers=8) as pool:
            rows = list(pool.map(row, ids))
        # Ids sort by second; within one second their random suffix decides, so order by created_at.
        return sorted(rows, key=lambda r: (r["created_at"] or "", r["version"]))

    def resolve_ref(self, ref: str) -> str:
        """A version id or an alias name -> version id."""
        if ref in ALIASES:
            v = self.resolve(ref)
            if v is None:
                raise RegistryError(f"alias '{ref}' points at no version yet; promote one with "
                                    "`cnnloop registry promote VERSION`")
            return v
        return check_version_id(ref)

    def fetch(self, ref: str, dest_dir: Path) -> Path:
        """Download a version (or an alias's) to dest_dir/<id>, every file verified; returns that path.

        Files land in a temporary folder beside it and are renamed into place only when all of them
        match bundle.json, so dest_dir/<id> is either absent or whole. A verified copy is reused."""
        version = self.resolve_ref(ref)
        manifest, meta = self._read_manifest(version)
        files = manifest_files(meta)
        dest_dir = Path(dest_dir)
        dest = dest_dir / version
        if dest.is_dir() and local_copy_problem(dest, manifest, meta) is None:
            return dest
        stored = {k.split("/", 2)[2] for k in self.store.list(f"versions/{version}")}
        if strangers := sorted(stored - set(files) - {BUNDLE_JSON}):
            raise RegistryError(f"version {version} holds files its {BUNDLE_JSON} does not list ({', '.join(strangers)}): "
                                "it was written to after publishing; refused")
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".part", dir=dest_dir))
        except OSError as e:
            raise RegistryError(f"cannot create {dest_dir} to fetch {version} into: {e}") from None
        try:
            for name, want in files.items():
                try:
                    data = self.store.get_bytes(f"versions/{version}/{name}")
                except StorageError:
                    if self.store.exists(f"versions/{version}/{name}"):
                        raise
                    raise RegistryError(f"version {version} is missing {name} in {self.describe()}; the bundle "
                                        "was damaged after publishing, refused") from None
                got = hashlib.sha256(data).hexdigest()
                if len(data) != want["size"] or got != want["sha256"]:
                    raise RegistryError(
                        f"version {version}: {name} fails verification (expected sha256 {want['sha256'][:12]}... "
                        f"size {want['size']}, got sha256 {got[:12]}... size {len(data)}); the stored file is "
                        "corrupt or was tampered with, refused")
                (tmp / name).write_bytes(data)
            (tmp / BUNDLE_JSON).write_bytes(manifest)
            self._move_into_place(tmp, dest, manifest, meta)
        except OSError as e:
            raise RegistryError(f"cannot write the fetched copy of {version} under {dest_dir}: {e}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    @staticmethod
    def _move_into_place(tmp: Path, dest: Path, manifest: bytes, meta: dict) -> None:
        for _ in range(5):
            try:
                os.rename(tmp, dest)  # fails while dest is a non-empty folder: never merges into one
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            # A concurrent fetcher's copy got there first; it is as good as ours.
            if local_copy_problem(dest, manifest, meta) is None:
                return
            # A stale or damaged copy: move it aside whole, so dest is never half old, half new.
            old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
            try:
                os.rename(dest, old)
            except FileNotFoundError:
                continue  # another fetcher moved it first
            shutil.rmtree(old, ignore_errors=True)
        # Only reachable when other fetchers keep replacing dest with copies that fail to verify.
        raise OSError(f"{dest} keeps changing while fetching into it")

    # aliases ----------------------------------------------------------------------------------
    def _parse_alias(self, alias: str, raw: bytes) -> dict:
        try:
            doc = json.loads(raw)
            check_version_id(doc["version"])
            if not isinstance(doc.get("history", []), list):
                raise ValueError("history is not a list")
            return doc
        except (ValueError, KeyError, TypeError, RegistryError) as e:
            raise RegistryError(f"alias '{alias}' in {self.describe()} is corrupt ({e}); promote a version "
                                "to rewrite it") from None

    def _read_alias(self, alias: str) -> dict | None:
        check_alias(alias)
        found = self.store.get_with_etag(f"aliases/{alias}.json")
        return self._parse_alias(alias, found[0]) if found else None

    def resolve(self, alias: str) -> str | None:
        """The version an alias points at, or None when it was never promoted."""
        doc = self._read_alias(alias)
        return doc["version"] if doc else None

    def _update_alias(self, alias: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, dict | None]:
        """Read-modify-write of one alias with optimistic concurrency: (old doc, new doc).

        The write succeeds only if the alias is still what we read (S3 If-Match on the ETag, a
        lock file locally), else we re-read and retry, so two concurrent promotes both land in
        the history. `change` returns None to leave the alias as it is."""
        key = f"aliases/{check_alias(alias)}.json"
        for attempt in range(ALIAS_WRITE_ATTEMPTS):
            found = self.store.get_with_etag(key)
            old = self._parse_alias(alias, found[0]) if found else None
            new = change(old)
            if new is None:
                return old, None
            new = {**new, "history": new["history"][:HISTORY_LIMIT], "updated_at": _now()}
            if self.store.put_if_match(key, json.dumps(new, indent=2).encode(), found[1] if found else None):
                return old, new
            time.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # back off so racing writers spread out
        raise RegistryError(f"alias '{alias}' in {self.describe()} kept changing during {ALIAS_WRITE_ATTEMPTS} "
                            "attempts; another promote is running, try again")

    def _record_event(self, event: str, alias: str, version: str, previous: str | None) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        body = {"event": event, "alias": alias, "version": version, "previous": previous, "at": _now()}
        self.store.put_bytes(f"events/{stamp}-{secrets.token_hex(4)}.json", json.dumps(body).encode())

    def promote(self, version: str, alias: str = "production", *, only_if: str | None = None) -> dict:
        """Point alias at a complete version; its old target goes on the history for rollback.

        `only_if`: move it only if it still points at that version, checked inside the same
        compare-and-swap as the write (AliasMoved otherwise): a retrain judged against the
        champion it read must not replace a version someone promoted meanwhile."""
        check_alias(alias)
        self.show(check_version_id(version))  # refuses unknown, incomplete and tampered versions

        def change(doc: dict | None) -> dict | None:
            current = doc["version"] if doc else None
            if only_if is not None and current != only_if:
                raise AliasMoved(f"alias '{alias}' points at {current}, not {only_if}; left unchanged")
            if doc and doc["version"] == version:
                return None
            history = [doc["version"], *doc.get("history", [])] if doc else []
            return {"version": version, "history": history}

        old, new = self._update_alias(alias, change)
        previous = old["version"] if old else None
        if new is not None:
            self._record_event("promote", alias, version, previous)
        return {"alias": alias, "version": version, "previous": previous, "changed": new is not None}

    def rollback(self, alias: str = "production") -> dict:
        """Point alias back at the version it pointed at before; returns the move made."""
        def change(doc: dict | None) -> dict:
            if not doc or not doc.get("history"):
                raise RegistryError(f"alias '{alias}' has no previous version to roll back to "
                                    "(see `cnnloop registry list`, then `cnnloop registry promote VERSION`)")
            return {"version": check_version_id(doc["history"][0]), "history": doc["history"][1:]}

        old, new = self._update_alias(alias, change)
        assert old is not None and new is not None  # change() raised otherwise
        self._record_event("rollback", alias, new["version"], old["version"])
        return {"alias": alias, "version": new["version"], "previous": old["version"], "changed": True}
