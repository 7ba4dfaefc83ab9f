"""The background log writer (service/log_writer.py) on a real log: batching, the durability contract, back-pressure.

A slow or failing store is a real SQLite log behind `Faulty`, which blocks or raises on command:
the writer cannot tell it from a PostgreSQL server that is slow or down.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporters.prediction_log.records import PredictionRecord, new_record_id
from exporters.prediction_log.sql import open_prediction_log
from service.log_writer import LogWriter
from service.metrics import ServiceMetrics

WAIT_S = 20  # bounded waits only; never a timing assertion


def _records(n: int, start: int = 0) -> list[PredictionRecord]:
    now = time.time()
    return [PredictionRecord(new_record_id(now), now, "v1", "a", 0.9, [0.9, 0.1], f"{start + i:064x}", True, "x.jpg",
                             np.ones(4, np.float16).tobytes(), "raw") for i in range(n)]


class Faulty:
    """A real log whose writes can be made to block (`gate` cleared) or fail (`failures` > 0)."""

    def __init__(self, log):
        self.log = log
        self.gate = threading.Event()
        self.gate.set()
        self.failures = 0
        self.batches: list[int] = []

    def store_image(self, sha, data):
        self.log.store_image(sha, data)

    def add_predictions(self, records):
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("gate never opened")
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("database is down")
        self.batches.append(len(records))
        self.log.add_predictions(records)


@pytest.fixture
def log(tmp_path):
    log = open_prediction_log(str(tmp_path / "data"))
    yield log
    log.close()


def _metric(metrics: ServiceMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def _writer(log, capacity=10_000, batch=100, interval=0.05):
    metrics = ServiceMetrics(CollectorRegistry())
    return LogWriter(log, metrics, capacity, batch, interval), metrics


def _wait(predicate) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_records_are_committed_in_batches_no_larger_than_the_batch_size(log):
    faulty = Faulty(log)
    faulty.gate.clear()  # let a backlog build, as under load
    writer, metrics = _writer(faulty, batch=100)
    for i in range(450):
        assert writer.submit(_records(1, i), [])
    faulty.gate.set()
    assert writer.flush(WAIT_S)
    assert log.count_predictions() == 450
    assert max(faulty.batches) <= 100 and len(faulty.batches) >= 5
    assert _metric(metrics, "cnnloop_log_written_records_total") == 450
    assert _metric(metrics, "cnnloop_log_queue_records") == 0
    writer.close(WAIT_S)


def test_a_lone_record_is_committed_once_its_batch_is_old_enough(log):
    writer, _ = _writer(log, batch=1000, interval=0.05)
    [rec] = _records(1)
    writer.submit([rec], [("ab" * 32, b"img")])
    assert _wait(lambda: log.get_prediction(rec.prediction_id) is not None)  # no flush asked
    assert log.image_bytes("ab" * 32) == b"img"  # the image is written before its record
    assert not writer.pending(rec.prediction_id)
    writer.close(WAIT_S)


def test_a_full_queue_drops_new_records_counts_them_and_never_blocks(log):
    faulty = Faulty(log)
    faulty.gate.clear()  # the store hangs
    writer, metrics = _writer(faulty, capacity=10, batch=5)
    accepted = [writer.submit(_records(1, i), []) for i in range(15)]
    assert accepted.count(True) == 10 and accepted[10:] == [False] * 5
    assert _metric(metrics, "cnnloop_log_dropped_records_total", reason="queue_full") == 5
    assert _metric(metrics, "cnnloop_log_queue_records") == 10  # what a crash now would lose: bounded
    faulty.gate.set()
    assert writer.flush(WAIT_S) and log.count_predictions() == 10
    writer.close(WAIT_S)


def test_a_store_that_is_down_for_a_while_loses_nothing_the_queue_holds(log):
    faulty = Faulty(log)
    faulty.failures = 3
    writer, metrics = _writer(faulty, batch=50)
    for i in range(20):
        writer.submit(_records(1, i), [])
    assert writer.flush(WAIT_S)
    assert log.count_predictions() == 20
    assert _metric(metrics, "cnnloop_log_write_failures_total") == 3
    writer.close(WAIT_S)


def test_a_clean_stop_drains_the_queue(log):
    faulty = Faulty(log)
    faulty.gate.clear()
    writer, _ = _writer(faulty, batch=7)
    for i in range(30):
        writer.submit(_records(1, i), [])
    threading.Timer(0.2, faulty.gate.set).start()
    assert writer.close(WAIT_S) == 0
    assert log.count_predictions() == 30
    assert not writer.submit(_records(1, 99), [])  # after close nothing is accepted silently


def test_a_stop_the_store_never_lets_finish_reports_what_it_lost(log):
    faulty = Faulty(log)
    faulty.gate.clear()
    writer, metrics = _writer(faulty, batch=5)
    for i in range(12):
        writer.submit(_records(1, i), [])
    assert writer.close(0.3) == 12
    assert _metric(metrics, "cnnloop_log_dropped_records_total", reason="stopping") == 12
    faulty.gate.set()


def test_flush_waits_for_a_pending_prediction_so_feedback_finds_it(log):
    faulty = Faulty(log)
    faulty.gate.clear()
    writer, _ = _writer(faulty, batch=1000, interval=30)  # a batch that would not close by itself for 30 s
    [rec] = _records(1)
    writer.submit([rec], [])
    assert writer.pending(rec.prediction_id) and log.get_prediction(rec.prediction_id) is None
    threading.Timer(0.1, faulty.gate.set).start()
    assert writer.flush(WAIT_S)
    assert log.get_prediction(rec.prediction_id) is not None and not writer.pending(rec.prediction_id)
    writer.close(WAIT_S)


def test_queue_size_zero_commits_before_submit_returns(log):
    writer, _ = _writer(log, capacity=0)
    [rec] = _records(1)
    assert writer.synchronous and writer.submit([rec], [])
    assert log.get_prediction(rec.prediction_id) is not None
    writer.close(WAIT_S)
