"""A lock in the data store, so two retrain runs (two CronJob pods, a cron and a person) never overlap.

Taken with a create-if-absent write; a lock older than its TTL belonged to a run that died without
releasing it and is taken over with a compare-and-swap on its etag, so two runs finding the same
stale lock cannot both win.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass

from exporters.storage import Store
from training.errors import TrainingError

LOCK_KEY = "locks/retrain.json"


class LockHeld(TrainingError):
    """Another retrain run holds the lock."""


@dataclass
class StoreLock:
    store: Store
    ttl_s: float
    key: str = LOCK_KEY

    def __post_init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.held = False

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired_at": now, "expires_at": now + self.ttl_s}).encode()

    def acquire(self) -> "StoreLock":
        if self.store.put_if_absent(self.key, self._body()):
            self.held = True
            return self
        current = self.store.get_with_etag(self.key)
        if current is None:  # released between our two calls: one more try
            return self.acquire()
        body, etag = current
        try:
            holder = json.loads(body)
            expires = float(holder["expires_at"])
        except (ValueError, KeyError, TypeError):
            holder, expires = {}, 0.0  # unreadable: treat as stale rather than block retraining forever
        if time.time() < expires:
            raise LockHeld(f"another retrain run holds {self.store.describe(self.key)} (host {holder.get('host')}, "
                           f"pid {holder.get('pid')}, until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}); "
                           "wait for it, or delete the lock object if that run is known dead")
        if not self.store.put_if_match(self.key, self._body(), etag):
            raise LockHeld(f"another run took over the stale lock {self.store.describe(self.key)} first")
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        current = self.store.get_with_etag(self.key)
        # Only our own lock: after a TTL takeover the object belongs to someone else.
        if current is not None and json.loads(current[0]).get("token") == self.token:
            self.store.delete(self.key)
        self.held = False

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
