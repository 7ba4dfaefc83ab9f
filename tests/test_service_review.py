"""The review queue over real HTTP: two replicas on one PostgreSQL log hand two reviewers disjoint
items, answers land in the log as review feedback, bad answers get clear 4xx and change nothing,
and Prometheus counts the queue."""
from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_server import published_model, serve, service_env  # noqa: F401  (fixture)

TOKEN = "review-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _images(model, n: int) -> list[Path]:
    return sorted(model.data_dir.rglob("*.png"))[:n]


@pytest.fixture(scope="module")
def replicas(published_model, postgres_server, tmp_path_factory):
    """Two service replicas sharing one PostgreSQL log and data dir, 40 predictions in it."""
    tmp = tmp_path_factory.mktemp("review")
    log_url = postgres_server.create_database()
    with contextlib.ExitStack() as stack:
        running = []
        for i in range(2):
            env = service_env(published_model.registry, tmp / "data", log_url=log_url, api_token=TOKEN,
                              log_flush_interval_ms=50, review_lease_s=120, review_refill_s=0)
            env["CNNLOOP_BUNDLE_CACHE_DIR"] = str(tmp / f"bundles-{i}")
            running.append(stack.enter_context(serve(env, tmp / f"r{i}.log")))
        clients = [stack.enter_context(r.client(headers=AUTH)) for r in running]
        paths = _images(published_model, 40)
        r = clients[0].post("/predict", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths])
        assert r.status_code == 200, r.text
        _wait_for_rows(log_url, "SELECT count(*) FROM predictions", len(paths))  # the log writer commits in the background
        yield clients, log_url, {a["prediction_id"]: p for a, p in zip(r.json()["predictions"], paths)}


def _wait_for_rows(log_url: str, sql: str, expect: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with psycopg.connect(log_url) as conn:
            found = conn.execute(sql).fetchone()[0]
        if found >= expect or time.monotonic() > deadline:
            assert found >= expect, f"{found} of {expect} rows committed after {timeout_s} s"
            return
        time.sleep(0.1)


def _metric(client, name: str, **labels) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _feedback_rows(log_url: str) -> list[tuple]:
    with psycopg.connect(log_url) as conn:
        return conn.execute("SELECT prediction_id, label, source, reviewer FROM feedback_events ORDER BY id").fetchall()


def test_two_reviewers_on_two_replicas_are_handed_disjoint_items(replicas):
    clients, _, predicted = replicas

    def take(i: int) -> list[str]:
        body = clients[i % 2].post("/review/next", json={"reviewer": f"rev{i}", "count": 4}).json()
        return [item["prediction_id"] for item in body["items"]]

    with ThreadPoolExecutor(6) as pool:
        batches = list(pool.map(take, range(6)))
    ids = [pid for batch in batches for pid in batch]
    assert len(ids) == 24 and len(set(ids)) == 24  # every lease held, none handed out twice
    assert set(ids) <= set(predicted)
    state = clients[1].get("/review/state").json()
    assert state["leased"] == 24 and state["waiting"] == 16


def test_an_answer_is_review_feedback_in_the_log_and_the_image_is_the_one_predicted(replicas):
    clients, log_url, predicted = replicas
    body = clients[0].post("/review/next", json={"reviewer": "alice", "count": 2}).json()
    item = body["items"][0]
    image = clients[1].get(item["image_url"])  # the other replica serves it from the shared store
    assert image.status_code == 200 and image.content == predicted[item["prediction_id"]].read_bytes()
    true_label = predicted[item["prediction_id"]].parent.name
    before = _metric(clients[0], "cnnloop_feedback_total", source="review")
    answer = clients[1].post("/review/answer", json={"lease_id": body["lease_id"], "prediction_id": item["prediction_id"],
                                                     "label": true_label})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "labeled"
    assert (item["prediction_id"], true_label, "review", "alice") in _feedback_rows(log_url)
    # (the two test replicas share one Prometheus multiprocess directory, so either shows the sum)
    assert _metric(clients[1], "cnnloop_feedback_total", source="review") == before + 1
    assert _metric(clients[1], "cnnloop_label_delay_seconds_count") >= 1
    skipped = clients[0].post("/review/answer", json={"lease_id": body["lease_id"],
                                                      "prediction_id": body["items"][1]["prediction_id"], "skip": True})
    assert skipped.json()["outcome"] == "skipped"
    assert body["items"][1]["prediction_id"] not in {row[0] for row in _feedback_rows(log_url)}


@pytest.mark.parametrize("change, status, code", [
    ({"lease_id": "0" * 24}, 409, "foreign_lease"),
    ({"prediction_id": "never-queued"}, 404, "not_queued"),
    ({"label": "no-such-class"}, 422, "unknown_label"),
    ({"label": None, "skip": False}, 400, "invalid_review_request"),
], ids=["foreign-lease", "never-queued", "unknown-class", "neither-label-nor-skip"])
def test_a_bad_answer_gets_a_clear_4xx_and_changes_nothing(replicas, change, status, code):
    clients, log_url, predicted = replicas
    body = clients[0].post("/review/next", json={"reviewer": "bob", "count": 1}).json()
    item = body["items"][0]
    request = {"lease_id": body["lease_id"], "prediction_id": item["prediction_id"], "label": "0", **change}
    before = _feedback_rows(log_url)
    r = clients[0].post("/review/answer", json={k: v for k, v in request.items() if v is not None})
    assert r.status_code == status and r.json()["error"] == code, r.text
    assert r.json()["message"]
    assert _feedback_rows(log_url) == before


def test_a_second_answer_to_the_same_lease_is_refused_until_undone(replicas):
    clients, log_url, _ = replicas
    body = clients[0].post("/review/next", json={"reviewer": "carol", "count": 1}).json()
    pid = body["items"][0]["prediction_id"]
    first = {"lease_id": body["lease_id"], "prediction_id": pid, "label": "0"}
    assert clients[0].post("/review/answer", json=first).status_code == 200
    again = clients[1].post("/review/answer", json={**first, "label": "1"})
    assert again.status_code == 409 and again.json()["error"] == "already_answered"
    undone = clients[1].post("/review/undo", json={"lease_id": body["lease_id"], "prediction_id": pid})
    assert undone.status_code == 200 and undone.json()["item"]["prediction_id"] == pid
    assert clients[0].post("/review/answer", json={**first, "label": "1"}).status_code == 200
    rows = [row for row in _feedback_rows(log_url) if row[0] == pid]
    assert [row[1] for row in rows] == ["0", "1"]  # the first label kept in the audit, the second wins


def test_review_routes_need_the_write_token(replicas, published_model):
    clients, _, _ = replicas
    base = str(clients[0].base_url)
    import httpx

    for method, path in (("POST", "/review/next"), ("GET", "/review/state"), ("POST", "/review/answer")):
        r = httpx.request(method, base + path, json={}, headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, r.text)


def test_prometheus_shows_the_queue_depth(replicas):
    clients, _, _ = replicas
    # Both test replicas write one Prometheus multiprocess directory (max over processes): ask both.
    state = [c.get("/review/state").json() for c in clients][0]
    assert _metric(clients[0], "cnnloop_review_queue_depth") == state["waiting"]


def test_the_spec_lists_the_review_routes_under_the_token(replicas):
    clients, _, _ = replicas
    spec = clients[0].get("/docs.json").json()
    for path in ("/review/next", "/review/answer", "/review/undo", "/review/state", "/review/image/{prediction_id}"):
        operation = next(iter(spec["paths"][path].values()))
        assert len(operation["security"]) == 1 and operation["security"][0], path  # the token is required
    assert json.dumps(spec["paths"]["/review/answer"]["post"]["responses"]["409"])


def test_traffic_that_arrives_while_items_wait_is_queued_at_the_next_call(replicas, published_model):
    """The queue is not only refilled when it runs low: leftovers of old traffic must not hide new images."""
    clients, log_url, _ = replicas

    def queued(state: dict) -> int:
        return state["waiting"] + state["leased"] + state["labeled"] + state["skipped"]

    before = clients[0].get("/review/state").json()
    assert before["waiting"] >= 1, "the queue must not be low for this test to mean anything"
    paths = _images(published_model, 48)[40:]
    r = clients[0].post("/predict", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    _wait_for_rows(log_url, "SELECT count(*) FROM predictions", 48)
    body = clients[1].post("/review/next", json={"reviewer": "dave", "count": 1}).json()
    assert queued(body["state"]) == queued(before) + len(paths)
