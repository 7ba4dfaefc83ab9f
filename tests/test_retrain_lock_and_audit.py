"""The retrain lock and the decision audit log, on a local store and on a real S3 endpoint (moto)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from exporters.storage import open_store
from training.retrain import audit
from training.retrain.lock import LOCK_KEY, LockHeld, StoreLock


def test_lock_keeps_a_second_run_out(store):
    with StoreLock(store, ttl_s=600):
        with pytest.raises(LockHeld, match="another retrain run holds"):
            StoreLock(store, ttl_s=600).acquire()


def test_lock_is_free_again_after_release(store):
    with StoreLock(store, ttl_s=600):
        pass
    assert not store.exists(LOCK_KEY)
    StoreLock(store, ttl_s=600).acquire().release()


def test_stale_lock_of_a_dead_run_is_taken_over(store):
    dead = StoreLock(store, ttl_s=60).acquire()
    body = json.loads(store.get_bytes(LOCK_KEY))
    store.put_bytes(LOCK_KEY, json.dumps({**body, "expires_at": time.time() - 1}).encode())
    taker = StoreLock(store, ttl_s=60).acquire()
    assert json.loads(store.get_bytes(LOCK_KEY))["token"] == taker.token
    dead.release()  # the dead run waking up must not free the new holder's lock
    assert store.exists(LOCK_KEY)
    taker.release()


def test_only_one_of_many_concurrent_runs_gets_the_lock(store):
    winners, losers = [], []

    def attempt():
        try:
            winners.append(StoreLock(store, ttl_s=600).acquire())
        except LockHeld:
            losers.append(1)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 5


def test_audit_log_appends_jsonl_lines_in_order(store):
    for i in range(3):
        audit.append_decision(store, {"i": i, "decision": {"retrain": False}})
    records = audit.read_decisions(store)
    assert [r["i"] for r in records] == [0, 1, 2]
    keys = store.list("audit")
    assert len(keys) == 1 and keys[0].endswith(".jsonl")
    assert len(store.get_bytes(keys[0]).decode().splitlines()) == 3


def test_concurrent_audit_writers_lose_no_line(store):
    threads = [threading.Thread(target=audit.append_decision, args=(store, {"i": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["i"] for r in audit.read_decisions(store)) == list(range(8))


def test_a_torn_audit_line_does_not_hide_the_rest(tmp_path):
    store = open_store(str(tmp_path / "s"))
    audit.append_decision(store, {"i": 1})
    key = store.list("audit")[0]
    store.put_bytes(key, store.get_bytes(key) + b'{"i": 2, "trunc')
    audit.append_decision(store, {"i": 3})
    assert [r["i"] for r in audit.read_decisions(store)] == [1, 3]
