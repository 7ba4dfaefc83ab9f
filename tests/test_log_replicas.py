"""Three service replicas (separate `bentoml serve` processes) on one real PostgreSQL under concurrent
predict + feedback load, while one replica is killed with SIGKILL and restarted.

What the durability contract (service/log_writer.py) promises, checked against the database:
- zero acknowledged feedback lost (feedback is committed before its 200);
- predictions the killed replica answered but never committed: at most its log queue (log_queue_size);
- predictions answered by replicas stopped cleanly: every one committed (a clean stop drains);
- the restart loses nothing that was committed before the kill.
"""
from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from exporters.prediction_log.sql import open_prediction_log
from tests.service_server import published_model, serve, service_env  # noqa: F401  (fixture)
from training.demo.service_process import kill_process_tree

pytestmark = pytest.mark.slow
QUEUE_SIZE = 200
LOAD_S = 6.0
CLIENTS = 6


def _replica_env(model, root: Path, name: str, log_url: str, flush_ms: int = 200) -> dict[str, str]:
    env = service_env(model.registry, root / "data", log_url=log_url, log_queue_size=QUEUE_SIZE,
                      log_flush_interval_ms=flush_ms, store_sample_rate=1.0)
    env["CNNLOOP_BUNDLE_CACHE_DIR"] = str(root / f"bundles-{name}")  # replicas share images, not unpacked bundles
    return env


class Load:
    """Closed-loop clients: predict one image on a replica, then label it on a replica (sometimes another one)."""

    def __init__(self, urls: list[str], images: list[tuple[str, bytes]], labels: list[str]):
        self.urls, self.images, self.labels = urls, images, labels
        self.answered: list[tuple[str, str, bool]] = []  # (replica url, prediction_id, logged)
        self.acknowledged: dict[str, str] = {}  # prediction_id -> label of the last feedback answered 200
        self.errors: list[str] = []
        self.killed: str | None = None  # the replica killed with SIGKILL
        self.unlabeled: str | None = None  # no feedback on this replica's predictions (feedback commits its queue)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counter = itertools.count()

    def _client(self, seed: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                n = next(self._counter)
                url = self.urls[n % len(self.urls)]
                name, data = self.images[n % len(self.images)]
                try:
                    r = http.post(url + "/predict", files={"images": (name, data, "image/png")})
                except httpx.TransportError:
                    continue  # a dead replica: nothing was acknowledged
                if r.status_code != 200:
                    self.errors.append(f"predict {r.status_code}: {r.text[:200]}")
                    continue
                answer = r.json()["predictions"][0]
                with self._lock:
                    self.answered.append((url, answer["prediction_id"], answer.get("logged", True)))
                if n % 2 or answer.get("logged") is False or url == self.unlabeled:
                    continue
                label = self.labels[(n + seed) % len(self.labels)]
                feedback_url = self.urls[(n + 1) % len(self.urls)] if n % 4 == 0 else url  # a load balancer may pick another
                try:
                    f = http.post(feedback_url + "/feedback", json={"prediction_id": answer["prediction_id"], "label": label})
                except httpx.TransportError:
                    continue
                if f.status_code == 200:
                    with self._lock:
                        self.acknowledged[answer["prediction_id"]] = label
                elif not (f.status_code == 404 and url == self.killed):
                    # 404 only for a prediction the killed replica still had queued; anything else is a bug
                    self.errors.append(f"feedback {f.status_code} via {feedback_url}: {f.text[:200]}")

    @contextlib.contextmanager
    def running(self):
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in threads:
                t.join(60)


def test_three_replicas_one_killed_lose_no_acknowledged_feedback_and_at_most_the_queue(published_model, postgres_url, tmp_path):
    model = published_model
    pngs = sorted(model.data_dir.rglob("*.png"))[:40]
    images = [(p.name, p.read_bytes()) for p in pngs]
    with contextlib.ExitStack() as stack:
        # The replica to be killed commits only every 10 s, so the kill surely finds records in its queue.
        replicas = [stack.enter_context(serve(_replica_env(model, tmp_path, f"r{i}", postgres_url, 10_000 if i == 0 else 200),
                                              tmp_path / f"r{i}.log"))
                    for i in range(3)]
        urls = [r.url for r in replicas]
        load = Load(urls, images, model.classes)
        with load.running():
            time.sleep(LOAD_S)
            # A second with no feedback on replica 0 (a feedback commits the queue): its queue now holds
            # about a second of predictions, and its next commit is 10 s away.
            load.unlabeled = urls[0]
            time.sleep(1.0)
            load.killed = urls[0]
            assert psutil.Process(replicas[0].process.pid).children(recursive=True), "expected the arbiter and its worker"
            alive = kill_process_tree(replicas[0].process)  # no drain, no shutdown hook: a crash
            assert not alive, f"still running after SIGKILL: {alive}"
            replicas[0].process.wait(30)
            killed_at = len(load.answered)
            log = open_prediction_log(str(tmp_path / "data"), log_url=postgres_url)
            committed_before_restart = {r.prediction_id for r in log.predictions()}
            time.sleep(LOAD_S / 2)  # the other two carry the traffic
            restarted = stack.enter_context(serve(_replica_env(model, tmp_path, "r0b", postgres_url), tmp_path / "r0b.log"))
            load.urls = [restarted.url, urls[1], urls[2]]
            time.sleep(LOAD_S / 2)
        for r in (restarted, replicas[1], replicas[2]):
            r.stop()  # SIGTERM: a clean stop drains the log queue
    assert not load.errors, load.errors[:5]
    assert killed_at > 50, f"only {killed_at} predictions before the kill: the load never got going"

    stored = {r.prediction_id: r for r in log.predictions()}
    lost_ack = {pid: label for pid, label in load.acknowledged.items() if pid not in stored or stored[pid].feedback_label != label}
    # A prediction labeled twice keeps its last label; the dict above holds the last label acknowledged.
    assert not lost_ack, f"{len(lost_ack)} acknowledged feedback label(s) are not in the database"
    logged = [(url, pid) for url, pid, ok in load.answered if ok]
    lost_from_killed = [pid for url, pid in logged if url == urls[0] and pid not in stored]
    lost_from_clean = [pid for url, pid in logged if url != urls[0] and pid not in stored]
    print(f"answered {len(load.answered)} ({killed_at} before the kill), logged {len(logged)}, feedback acknowledged "
          f"{len(load.acknowledged)}, lost by the SIGKILL {len(lost_from_killed)} (bound {QUEUE_SIZE}), lost elsewhere {len(lost_from_clean)}")
    assert 0 < len(lost_from_killed) <= QUEUE_SIZE, (f"the crash lost {len(lost_from_killed)} predictions: more than the "
                                                      "queue holds, or none (then the kill was no crash)")
    assert not lost_from_clean, f"{len(lost_from_clean)} predictions answered by cleanly stopped replicas were never committed"
    assert committed_before_restart <= set(stored), "the restart lost records committed before it"
    assert sum(1 for url, _ in logged if url == urls[0]) > 0 and sum(1 for url, _ in logged if url == restarted.url) > 0
    log.close()
