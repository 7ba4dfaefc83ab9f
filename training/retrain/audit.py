"""The decision audit log: one JSON line per retrain check, in the data store (local dir or S3).

One JSONL object per UTC day (`audit/decisions-YYYY-MM-DD.jsonl`), appended by a conditional
write (compare-and-swap on the object's etag) so two writers never drop each other's lines on S3,
where there is no append.
"""
from __future__ import annotations

import json
import time

from exporters.errors import StorageError
from exporters.storage import Store

PREFIX = "audit"
ATTEMPTS = 20


def _day_key(at: float) -> str:
    return f"{PREFIX}/decisions-{time.strftime('%Y-%m-%d', time.gmtime(at))}.jsonl"


def append_decision(store: Store, record: dict) -> dict:
    record = {"at": time.time(), **record}
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    key = _day_key(record["at"])
    for _ in range(ATTEMPTS):
        current = store.get_with_etag(key)
        body, etag = current if current else (b"", None)
        if body and not body.endswith(b"\n"):
            body += b"\n"  # a writer died mid-line: keep our line whole and separate
        if store.put_if_match(key, body + line.encode(), etag):
            return record
        time.sleep(0.05)
    raise StorageError(f"could not append to {store.describe(key)}: {ATTEMPTS} concurrent writers in a row; try again")


def read_decisions(store: Store, limit: int | None = None) -> list[dict]:
    """Oldest first; a torn or hand-edited line is skipped rather than hiding the rest."""
    out: list[dict] = []
    for key in sorted(k for k in store.list(PREFIX) if k.endswith(".jsonl")):
        for line in store.get_bytes(key).decode(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out[-limit:] if limit else out
