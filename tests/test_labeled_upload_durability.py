"""A labeled upload (POST /feedback/image) answered 201 is in the log even when its replica is killed
with SIGKILL right after: unlike a prediction, which waits in the log queue, an upload commits before
its answer (service/runtime.py add_labeled_upload). Checked against the database, on both backends.
"""
from __future__ import annotations

import hashlib
import threading
import time

import httpx
import pytest

from exporters.prediction_log.records import LABELED_UPLOAD
from exporters.prediction_log.sql import open_prediction_log
from tests.log_backends import backend, log_url_for  # noqa: F401  (fixture)
from tests.service_server import published_model, serve, service_env  # noqa: F401  (fixture)
from training.demo.service_process import kill_process_tree

CLIENTS = 4
# Enough acknowledged uploads that the kill surely lands with others in flight.
ACKNOWLEDGED_BEFORE_KILL = 20


def test_an_acknowledged_labeled_upload_survives_its_replica_being_killed(published_model, backend, request, tmp_path):
    model = published_model
    log_url = log_url_for(request, backend)
    env = service_env(model.registry, tmp_path / "data", **({"log_url": log_url} if log_url else {}))
    images = [(p.name, p.read_bytes()) for p in sorted(model.data_dir.rglob("*.png"))[:40]]
    acknowledged: dict[str, tuple[str, str, bytes]] = {}  # upload_id -> (label, image sha256, bytes sent)
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    with serve(env, tmp_path / "replica.log") as replica:
        def client(first: int) -> None:
            with httpx.Client(timeout=30) as http:
                n = first
                while not stop.is_set():
                    name, data = images[n % len(images)]
                    label = model.classes[n % len(model.classes)]
                    n += CLIENTS
                    try:
                        r = http.post(replica.url + "/feedback/image", files={"image": (name, data, "image/png")},
                                      data={"label": label})
                    except httpx.TransportError:
                        return  # the replica is gone: this upload was never acknowledged
                    if r.status_code == 201:
                        body = r.json()
                        with lock:
                            acknowledged[body["upload_id"]] = (label, body["image_sha256"], data)
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while len(acknowledged) < ACKNOWLEDGED_BEFORE_KILL and not errors and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = kill_process_tree(replica.process)  # no drain, no shutdown hook: a crash
            assert not alive, f"still running after SIGKILL: {alive}"
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert not errors, errors[:5]
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL, f"only {len(acknowledged)} uploads acknowledged before the kill"

    log = open_prediction_log(str(tmp_path / "data"), log_url=log_url)
    try:
        stored = {e.record_id: e for e in log.labeled_examples() if e.source == LABELED_UPLOAD}
        lost = sorted(set(acknowledged) - set(stored))
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged uploads are not in the log"
        for upload_id, (label, sha, data) in acknowledged.items():
            assert (stored[upload_id].label, stored[upload_id].image_sha256) == (label, sha)
            assert hashlib.sha256(log.image_bytes(sha)).hexdigest() == sha == hashlib.sha256(data).hexdigest()
    finally:
        log.close()
