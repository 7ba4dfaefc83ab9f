"""The prediction log on SQL vs before: /predict with logging on, store requests, drift-window reads.

Three measurements in one process run, every store real, reported as ratios:
  1. /predict images/s at concurrency 32 (closed loop, one JPEG per request) while the log goes to
     a PostgreSQL whose every round trip costs >= 25 ms (bench/delay_proxy.py in front of a local
     server, like a database in another zone): (a) log off, (b) the synchronous path
     (CNNLOOP_LOG_QUEUE_SIZE=0, how every prediction was logged before the queue), (c) the queued
     writer at its defaults. (a) runs first and last (not with --quick) and the higher figure is
     kept, so noise can only make the ratios look worse. After (b) and (c) stop cleanly (SIGTERM: the queue drains),
     the rows in the database are counted against the answers that did not say logged=false.
  2. Store requests per 1,000 predictions, requests of one new image each: before, the
     S3PredictionLog of commit 315fe28 (loaded from git) on a moto S3 server, one object per record;
     after, service/log_writer.LogWriter at its default settings over open_prediction_log(S3 images,
     PostgreSQL behind the proxy), fed as fast as possible (burst) and at a steady rate (paced).
     S3 requests are counted by a botocore before-send hook on the store's client (every HTTP
     attempt); SQL round trips by the proxy, SQL statements by SQLAlchemy's before_cursor_execute.
  3. The drift check's read, `log.predictions(last=N, model_version=V)` + `log.label_changes(ids)`
     (training/retrain/job.py::drift_check), vs the log's size: a SQLite file and PostgreSQL (not
     proxied), median of 3; PostgreSQL both straight after the bulk fill (maybe no planner
     statistics yet, as after an import) and after ANALYZE (what autovacuum does within a minute).
     Before: the legacy S3 log on moto (a server process of its own) at 10^3 and 10^4 objects;
     writing 10^6 objects to moto here would take hours, so its requests at 10^6 are extrapolated
     from its code path (checked against the counts measured at the smaller sizes).

    python bench/log_store.py [--quick] [--seconds 15] [--sizes 10000 100000 1000000] [--s3-sizes 1000 10000]

The served model is the tiny digits model of tests/service_server.py (trained and published in
about a minute on 2 cores; 64 px, so inference is cheap and the log's share of each request is the
largest; --registry reuses a published one) unless
--model hymenoptera (bench/serve.py's, about a minute to train). Images: hymenoptera/val JPEGs when
present, else the digits as JPEGs. PostgreSQL, moto and the proxy run on this machine and take
their share of its CPU in rows (b) and (c). Results: bench/results/log_store.json and markdown
tables on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"
RESULTS = ROOT / "bench" / "results" / "log_store.json"
LEGACY_COMMIT = "315fe28"

from bench.delay_proxy import DelayProxy  # noqa: E402
from bench.log_store_tools import (S3RequestCounter, count_statements, load_legacy_log_module, moto_s3,  # noqa: E402
                                   postmaster_pid, tree_cpu_s, via_proxy)
from exporters.prediction_log.records import PredictionRecord, encode_embedding, new_record_id  # noqa: E402
from exporters.prediction_log.sql import open_prediction_log  # noqa: E402

# Synthetic log traffic: three model versions side by side (2, 5 and 10 classes); the drift check
# reads the newest, which serves half the traffic. 1% of predictions get feedback, 10% of those twice.
VERSIONS = (("v20260301-000000-aaaaaa", 2, 0.15), ("v20260401-000000-bbbbbb", 5, 0.35), ("v20260501-000000-cccccc", 10, 0.5))
DRIFT_VERSION = VERSIONS[-1][0]
FEEDBACK_RATE, RELABEL_RATE = 0.01, 0.1
FILL_BATCH = 10_000
HISTORY_START = 1.7e9  # record i was predicted at HISTORY_START + i seconds
_T0 = time.perf_counter()


def note(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f}s] {message}", file=sys.stderr, flush=True)


def synthetic_batch(rng: np.random.Generator, start: int, n: int) -> tuple[list[PredictionRecord], list[tuple[int, list[str]]]]:
    """Records start..start+n-1 (time-ordered ids) and their feedback: (index in the batch, labels given in turn)."""
    version_of = rng.choice(len(VERSIONS), size=n, p=[v[2] for v in VERSIONS])
    probs: list = [None] * n
    tops = np.zeros(n, dtype=int)
    for v, (_, classes, _) in enumerate(VERSIONS):
        rows = np.flatnonzero(version_of == v)
        drawn = rng.dirichlet(np.full(classes, 0.3), size=len(rows)).round(6)
        tops[rows] = drawn.argmax(axis=1)
        for j, p in zip(rows, drawn.tolist()):
            probs[j] = p
    embeddings = rng.standard_normal((n, 64)).astype(np.float16)
    shas = rng.bytes(32 * n).hex()
    records = []
    for j in range(n):
        name, _, _ = VERSIONS[version_of[j]]
        top = int(tops[j])
        created = HISTORY_START + start + j
        records.append(PredictionRecord(
            prediction_id=new_record_id(created), created_at=created, model_version=name, label=f"class_{top}",
            confidence=probs[j][top], probabilities=probs[j], image_sha256=shas[64 * j:64 * (j + 1)],
            image_stored=True, filename=f"img_{start + j}.jpg", embedding=encode_embedding(embeddings[j]),
            embedding_space="pca"))
    feedback = []
    for j in np.flatnonzero(rng.random(n) < FEEDBACK_RATE):
        classes = VERSIONS[version_of[j]][1]
        first = int(rng.integers(classes))
        labels = [first, (first + 1) % classes] if rng.random() < RELABEL_RATE else [first]
        feedback.append((int(j), [f"class_{c}" for c in labels]))
    return records, feedback


# 1. /predict throughput with the log on a slow store ---------------------------------------------

def closed_loop(url: str, images: list[tuple[str, bytes]], concurrency: int, seconds: float, warmup_s: float) -> dict:
    """bench/serve.py's closed loop, also counting the predictions answered and those logged (every request)."""
    from bench.serve import closed_loop as serve_closed_loop

    counts = {"answered": 0, "answered_logged": 0}

    def count(body: bytes) -> None:
        predictions = json.loads(body)["predictions"]
        counts["answered"] += len(predictions)
        counts["answered_logged"] += sum(p.get("logged", True) is not False for p in predictions)

    row = asyncio.run(serve_closed_loop(url, "images", images, concurrency, seconds, warmup_s, on_answer=count))
    return {**row, **counts}


def log_metrics(base_url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {name: float(value) for name, _, value in (line.rpartition(" ") for line in text.splitlines())
            if name.startswith("cnnloop_log_") and not name.startswith("#")}


@dataclass
class PredictBench:
    """What every /predict row shares: the model, the images, the proxied PostgreSQL, the run's arguments."""

    registry: str
    images: list[tuple[str, bytes]]
    work: Path
    pg: object  # tests.postgres_server.PostgresServer
    proxy: DelayProxy
    args: argparse.Namespace

    def row(self, name: str, settings: dict, database: str | None = None) -> dict:
        """One service start logging to `database` (through the proxy), one closed loop, a clean stop, the rows counted."""
        from tests.service_server import serve, service_env

        env = service_env(self.registry, self.work / name / "data", poll_interval_s=0, **settings)
        if database:
            env["CNNLOOP_LOG_URL"] = via_proxy(database, self.proxy)
        a = self.args
        with serve(env, self.work / name / "service.log") as svc:
            model = svc.client().get("/info").json()["model"]
            self.proxy.reset_counts()  # startup (schema check, pool) is not the workload
            pids = {"service": svc.process.pid, "postgres": postmaster_pid(self.pg), "bench": os.getpid()}
            cpu = {k: tree_cpu_s(pid) for k, pid in pids.items()}
            row = closed_loop(svc.url + "/predict", self.images, a.concurrency, a.seconds, a.warmup)
            # Over the whole loop, warm-up included: on 2 shared cores every CPU second is someone's throughput.
            row["cpu_s_per_1000_predictions"] = {k: 1000 * (tree_cpu_s(pid) - cpu[k]) / max(row["answered"], 1)
                                                 for k, pid in pids.items()}
            row["log_metrics"] = log_metrics(svc.url)
            stop_started = time.perf_counter()
        row["served"] = {k: model[k] for k in ("version", "variant", "providers", "input")}
        row["stop_s"] = time.perf_counter() - stop_started
        row["exit_code"] = svc.process.returncode
        row["unwritten_at_stop"] = "records unwritten" in svc.log_text()
        trips = self.proxy.reset_counts()  # the drain at stop included
        row["store_round_trips"] = trips.round_trips
        row["store_round_trips_per_1000_predictions"] = 1000 * trips.round_trips / max(row["answered"], 1)
        if database:
            log = open_prediction_log(str(self.work / name / "count"), log_url=database)
            row["rows_in_database"] = log.count_predictions()
            log.close()
        note(f"({name}) {row['images_per_s']:.1f} img/s, p50 {_ms(row['p50_ms'])} ms, failures {row['failures']}, "
             f"logged {row['answered_logged']}/{row['answered']}, rows in the database {row.get('rows_in_database', '-')}")
        return row


def predict_throughput(bench: PredictBench) -> dict:
    off = dict(log_predictions="false")
    rows = {"a_log_off": bench.row("a_log_off", off),
            "b_synchronous": bench.row("b_synchronous", dict(log_queue_size=0), bench.pg.create_database()),
            "c_queued": bench.row("c_queued", {}, bench.pg.create_database())}
    measurements = [round(rows["a_log_off"]["images_per_s"], 1)]
    if bench.args.repeat_baseline:
        again = bench.row("a_log_off_again", off)
        measurements.append(round(again["images_per_s"], 1))
        if again["images_per_s"] > rows["a_log_off"]["images_per_s"]:
            rows["a_log_off"] = again
    rows["a_log_off"]["measurements"] = measurements
    baseline = rows["a_log_off"]["images_per_s"]
    for row in rows.values():
        row["vs_log_off"] = row["images_per_s"] / max(baseline, 1e-9)
    c = rows["c_queued"]
    return {"store_delay_ms": bench.proxy.delay_s * 1000, "rows": rows, "goal_c_vs_log_off": 0.9,
            "c_clean_stop_drained": c.get("rows_in_database") == c["answered_logged"]}


# 2. store requests per 1,000 predictions ---------------------------------------------------------

def distinct_jpegs(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """n small JPEGs with distinct bytes: (sha256, bytes)."""
    import hashlib

    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
        out.append((hashlib.sha256(buf.getvalue()).hexdigest(), buf.getvalue()))
    return out


def legacy_writes(legacy, endpoint: str, uri: str, records, images) -> dict:
    """What the service did before the SQL log, per request: store the image once, PUT the record."""
    from exporters.storage import open_store

    store = open_store(uri, endpoint_url=endpoint)
    log, s3 = legacy.S3PredictionLog(store), S3RequestCounter(store.client)
    t = time.perf_counter()
    for record, (sha, data) in zip(records, images):
        log.store_image(sha, data)
        log.add_predictions([record])
    return {"s3": s3.take(), "sql_round_trips": 0, "sql_statements": {}, "seconds": time.perf_counter() - t}


def writer_writes(endpoint: str, uri: str, log_url: str, proxy: DelayProxy, records, images, rate: float | None) -> dict:
    """The new path: LogWriter at the service's defaults, one submit per one-image request."""
    from prometheus_client import CollectorRegistry

    from service.log_writer import LogWriter
    from service.metrics import ServiceMetrics
    from service.settings import ServiceSettings

    defaults = {k: f.default for k, f in ServiceSettings.model_fields.items()}
    log = open_prediction_log(uri, endpoint, log_url=log_url)
    s3, statements = S3RequestCounter(log.images.client), count_statements(log.engine)
    proxy.reset_counts()
    writer = LogWriter(log, ServiceMetrics(CollectorRegistry()), defaults["log_queue_size"],
                       defaults["log_batch_size"], defaults["log_flush_interval_ms"] / 1000)
    t = time.perf_counter()
    refused = 0
    for i, (record, image) in enumerate(zip(records, images)):
        if rate:
            time.sleep(max(0.0, t + i / rate - time.perf_counter()))
        refused += not writer.submit([record], [image])
    lost = writer.close(timeout=120)
    seconds = time.perf_counter() - t
    trips = proxy.reset_counts()
    out = {"s3": s3.take(), "sql_round_trips": trips.round_trips, "sql_chunks": trips.requests,
           "sql_connections": trips.connections, "sql_statements": dict(statements), "seconds": seconds,
           "refused": refused, "lost": lost, "rows_in_database": log.count_predictions(), "rate_per_s": rate}
    log.close()
    return out


def store_requests(legacy, endpoint: str, bucket: str, pg, proxy: DelayProxy, n: int, rate: float) -> dict:
    images = distinct_jpegs(n)
    records, _ = synthetic_batch(np.random.default_rng(2), 0, n)
    for record, (sha, _) in zip(records, images):
        record.image_sha256 = sha
    result = {"predictions": n, "before": legacy_writes(legacy, endpoint, f"s3://{bucket}/before", records, images)}
    for name, r in (("after_burst", None), ("after_paced", rate)):
        result[name] = writer_writes(endpoint, f"s3://{bucket}/{name}", via_proxy(pg.create_database(), proxy),
                                     proxy, records, images, r)
    note(f"store requests: before {sum(result['before']['s3'].values())} S3, after "
         f"{sum(result['after_burst']['s3'].values())} S3 + {result['after_burst']['sql_round_trips']} SQL round trips")
    return result


# 3. drift-window read time vs log size -----------------------------------------------------------

def time_drift_read(log, last: int, repeats: int = 3) -> dict:
    """What drift_check reads: the newest `last` predictions of the drift version, then their label changes."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        records = log.predictions(last=last, model_version=DRIFT_VERSION)
        changes = log.label_changes(r.prediction_id for r in records)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "all_s": times, "records": len(records), "feedback_events": changes.count}


def query_plan(log, last: int) -> str:
    """The database's plan for the window query, captured from the statement the log sends."""
    from sqlalchemy import event

    seen = []
    capture = lambda conn, cur, stmt, params, *a: seen.append((stmt, params))  # noqa: E731
    event.listen(log.engine, "before_cursor_execute", capture)
    try:
        log.predictions(last=last, model_version=DRIFT_VERSION)
    finally:
        event.remove(log.engine, "before_cursor_execute", capture)
    stmt, params = next((s, p) for s, p in seen if "FROM predictions" in s)
    with log.engine.connect() as conn:
        rows = conn.exec_driver_sql(("EXPLAIN QUERY PLAN " if log.dialect == "sqlite" else "EXPLAIN ") + stmt, params).all()
    return " | ".join(str(r[-1]).strip() for r in rows[:6])


def analyze_postgres(log) -> bool:
    """ANALYZE the log's tables, as autovacuum does within about a minute of a bulk insert; True if it already had."""
    with log.engine.begin() as conn:
        had = conn.exec_driver_sql("SELECT last_autoanalyze IS NOT NULL FROM pg_stat_user_tables "
                                   "WHERE relname = 'predictions'").scalar()
        conn.exec_driver_sql("ANALYZE predictions")
        conn.exec_driver_sql("ANALYZE feedback_events")
    return bool(had)


def fill_sql(log, have: int, target: int, rng: np.random.Generator) -> None:
    from sqlalchemy import insert

    from exporters.prediction_log import schema as log_schema

    for start in range(have, target, FILL_BATCH):
        records, feedback = synthetic_batch(rng, start, min(FILL_BATCH, target - start))
        events = []
        for j, labels in feedback:
            r = records[j]
            r.feedback_label, r.feedback_at = labels[-1], r.created_at + 60 * len(labels)
            events += [{"prediction_id": r.prediction_id, "label": label, "previous_label": labels[k - 1] if k else None,
                        "at": r.created_at + 60 * (k + 1)} for k, label in enumerate(labels)]
        log.add_predictions(records)
        if events:
            with log.engine.begin() as conn:
                conn.execute(insert(log_schema.feedback_events), events)


def fill_legacy(log, have: int, target: int, rng: np.random.Generator, pool: ThreadPoolExecutor) -> None:
    for start in range(have, target, FILL_BATCH):
        records, feedback = synthetic_batch(rng, start, min(FILL_BATCH, target - start))
        list(pool.map(lambda r: log.add_predictions([r]), records))
        for j, labels in feedback:
            for label in labels:
                log.record_feedback(records[j].prediction_id, label)


def legacy_read_requests(n: int, last: int) -> int:
    """S3 requests the legacy drift read makes on a log of n records (its code path, with VERSIONS' share)."""
    share = VERSIONS[-1][2]
    feedback_objects = n * FEEDBACK_RATE * (1 + RELABEL_RATE)
    record_gets = min(n, math.ceil(last / share))  # newest first until `last` of the drift version
    lists = math.ceil(max(n, 1) / 1000) + 2 * math.ceil(max(feedback_objects, 1) / 1000)  # predictions/, feedback/ twice
    return lists + record_gets + round(min(n * share, last) * FEEDBACK_RATE)


def drift_read_times(pg, legacy, endpoint: str, bucket: str, work: Path, sizes, s3_sizes, last: int) -> dict:
    from exporters.storage import open_store

    out: dict = {"last": last, "model_version_share": VERSIONS[-1][2], "sqlite": [], "postgresql_as_filled": [],
                 "postgresql": [], "legacy_s3": []}
    for name, log in (("sqlite", open_prediction_log(str(work / "drift-sqlite"))),
                      ("postgresql", open_prediction_log(str(work / "drift-pg"), log_url=pg.create_database()))):
        rng, have = np.random.default_rng(3), 0
        for size in sorted(sizes):
            t = time.perf_counter()
            fill_sql(log, have, size, rng)
            have = size
            row = {"size": size, "fill_s": time.perf_counter() - t, **time_drift_read(log, last), "plan": query_plan(log, last)}
            if name == "postgresql":
                # Straight after a bulk fill the planner may have no statistics yet (a fresh import is the same).
                out["postgresql_as_filled"].append({**row, "autovacuum_had_analyzed": analyze_postgres(log)})
                row = {"size": size, "fill_s": row["fill_s"], **time_drift_read(log, last), "plan": query_plan(log, last)}
            out[name].append(row)
            note(f"drift read {name} @ {size}: {row['median_s'] * 1000:.0f} ms (fill {row['fill_s']:.0f}s)")
        log.close()
    store = open_store(f"s3://{bucket}/drift", endpoint_url=endpoint)
    log, s3 = legacy.S3PredictionLog(store), S3RequestCounter(store.client)
    rng, have = np.random.default_rng(3), 0
    with ThreadPoolExecutor(8) as pool:
        for size in sorted(s3_sizes):
            t = time.perf_counter()
            fill_legacy(log, have, size, rng, pool)
            have = size
            fill_s, _ = time.perf_counter() - t, s3.take()
            row = {"size": size, "fill_s": fill_s, **time_drift_read(log, last)}
            row["requests_per_read"] = sum(s3.take().values()) / len(row["all_s"])
            row["requests_per_read_model"] = legacy_read_requests(size, last)
            out["legacy_s3"].append(row)
            note(f"drift read legacy S3 @ {size}: {row['median_s'] * 1000:.0f} ms, {row['requests_per_read']:.0f} requests")
    if out["legacy_s3"]:
        biggest = out["legacy_s3"][-1]
        per_request = biggest["median_s"] / biggest["requests_per_read"]
        requests = legacy_read_requests(max(sizes), last)
        out["legacy_s3_extrapolated"] = {
            "size": max(sizes), "requests_per_read": requests, "seconds_on_this_moto": requests * per_request,
            "seconds_at_25ms_per_request": requests * 0.025,
            "why": "not measured: writing 10^6 objects one PUT each to moto on this machine would take hours; "
                   "the legacy read is sequential requests, so its time is requests x per-request time"}
    return out


# report ------------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def plan_step(plan: str) -> str:
    """The step of a plan that says whether the window is read in index order (a Sort means it is not)."""
    steps = plan.split(" | ")
    return next((x for x in steps if "Sort" in x or "SEARCH" in x or "SCAN" in x or "Scan" in x), steps[0]).lstrip("-> ")[:70]


def tables(result: dict) -> str:
    m1 = result["predict_throughput"]
    lines = [f"### /predict at concurrency {result['concurrency']}, log store round trip >= {m1['store_delay_ms']:.0f} ms",
             "", "| row | img/s | vs (a) | p50 / p95 ms | failures | logged / answered | rows in PG | SQL round trips / 1000 pred. "
             "| CPU s / 1000 pred.: service, PG |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in m1["rows"].items():
        cpu = r["cpu_s_per_1000_predictions"]
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['vs_log_off']:.2f}x | {_ms(r['p50_ms'])} / {_ms(r['p95_ms'])} "
                     f"| {r['failures']} | {r['answered_logged']} / {r['answered']} | {r.get('rows_in_database', '-')} "
                     f"| {r['store_round_trips_per_1000_predictions']:.0f} | {cpu['service']:.1f}, {cpu['postgres']:.1f} |")
    lines.append(f"\n(a) measured {m1['rows']['a_log_off']['measurements']} img/s, the higher kept. Goal (c) >= "
                 f"{m1['goal_c_vs_log_off']}x (a). After (c) stopped cleanly, rows in PG == answers logged: "
                 f"{m1['c_clean_stop_drained']}.")
    m2 = result["store_requests"]
    per = 1000 / m2["predictions"]

    def kinds(row: dict) -> list[str]:
        s3 = row["s3"]
        return [f"{per * s3.get('PutObject predictions', 0):.0f}",
                f"{per * (s3.get('HeadObject images', 0) + s3.get('PutObject images', 0)):.0f}",
                f"{per * row['sql_round_trips']:.0f}", f"{per * sum(row['sql_statements'].values()):.0f}",
                f"{per * (sum(s3.values()) + row['sql_round_trips']):.0f}"]

    before_total = sum(m2["before"]["s3"].values())
    lines += ["", f"### Store requests per 1,000 predictions (one new image each; {m2['predictions']} written)", "",
              "| path | S3 record PUTs | S3 image HEAD+PUT | SQL round trips | SQL statements | all requests | vs before |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("before", "after_burst", "after_paced"):
        row = m2[name]
        label = {"before": f"before: S3PredictionLog ({result['legacy_commit']})", "after_burst": "after: LogWriter, burst",
                 "after_paced": f"after: LogWriter, {row.get('rate_per_s') or 0:.0f}/s"}[name]
        total = sum(row["s3"].values()) + row["sql_round_trips"]
        lines.append(f"| {label} | " + " | ".join(kinds(row)) + f" | {total / max(before_total, 1):.2f}x |")
    m3 = result["drift_read"]
    lines += ["", f"### Drift-window read (--last {m3['last']}, one model version) vs log size, median of 3", "",
              "| log | size | read ms | vs smallest | records read | S3 requests / read | plan |", "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("sqlite", "postgresql_as_filled", "postgresql", "legacy_s3"):
        rows = m3[name]
        for r in rows:
            s3_requests = f"{r['requests_per_read']:.0f}" if "requests_per_read" in r else "-"
            plan = plan_step(r["plan"]) if "plan" in r else "-"
            lines.append(f"| {name} | {r['size']:,} | {r['median_s'] * 1000:.0f} | {r['median_s'] / rows[0]['median_s']:.2f}x "
                         f"| {r['records']} | {s3_requests} | {plan} |")
    if "legacy_s3_extrapolated" in m3:
        e = m3["legacy_s3_extrapolated"]
        lines.append(f"| legacy_s3 (extrapolated) | {e['size']:,} | {e['seconds_on_this_moto'] * 1000:.0f} "
                     f"(at 25 ms/request: {e['seconds_at_25ms_per_request'] * 1000:.0f}) | - | - | {e['requests_per_read']} | - |")
    return "\n".join(lines)


def load_images(model_data: Path | None) -> tuple[str, list[tuple[str, bytes]]]:
    from bench.serve import load_jpegs

    if (DATA / "val").is_dir():
        return str(DATA / "val"), load_jpegs(DATA / "val")
    if model_data is None:
        raise SystemExit(f"no JPEGs: {DATA / 'val'} is missing and --registry gives no digits to render")
    from PIL import Image

    out = []
    for p in sorted(model_data.rglob("*.png")):
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, "JPEG", quality=90)
        out.append((p.stem + ".jpg", buf.getvalue()))
    return f"{model_data} as JPEG", out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: short rows, small logs (under 2 minutes)")
    ap.add_argument("--model", choices=["digits", "hymenoptera"], default="digits")
    ap.add_argument("--registry", help="serve this registry's production model instead of publishing one")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per /predict row")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="added to every client->server chunk to PostgreSQL")
    ap.add_argument("--predictions", type=int, default=1000, help="predictions written in measurement 2")
    ap.add_argument("--paced-rate", type=float, default=100.0, help="predictions/s of the paced LogWriter run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6], help="SQL log sizes")
    ap.add_argument("--s3-sizes", type=int, nargs="+", default=[10**3, 10**4], help="legacy S3 log sizes")
    ap.add_argument("--last", type=int, default=5000, help="the drift window")
    ap.add_argument("--legacy-commit", default=LEGACY_COMMIT)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.repeat_baseline = not args.quick
    if args.quick:
        args.seconds, args.warmup, args.predictions, args.last = 4.0, 1.0, 100, 1000
        args.sizes, args.s3_sizes = [2000, 20_000], [100, 200]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}", file=sys.stderr)

    from tests.postgres_server import PostgresServer

    with tempfile.TemporaryDirectory(prefix="cnnloop-bench-log-") as tmp, PostgresServer() as pg, \
            DelayProxy("127.0.0.1", pg.port, delay_s=args.delay_ms / 1000) as proxy, moto_s3(Path(tmp)) as (endpoint, bucket):
        work = Path(tmp)
        legacy = load_legacy_log_module(work, args.legacy_commit)
        model_data = None
        if args.registry:
            registry = args.registry
        elif args.model == "hymenoptera":
            from bench.serve import prepare_model

            registry, _ = prepare_model(work / "model")
        else:
            from tests.service_server import publish_digits_model

            published = publish_digits_model(work / "model")
            registry, model_data = str(published.registry), published.data_dir
        images_from, images = load_images(model_data)
        note(f"model ready ({args.registry or args.model}); {len(images)} images from {images_from}")
        seconds = {"setup": time.perf_counter() - _T0}
        t = time.perf_counter()
        m1 = predict_throughput(PredictBench(registry, images, work, pg, proxy, args))
        seconds["predict_throughput"], t = time.perf_counter() - t, time.perf_counter()
        m2 = store_requests(legacy, endpoint, bucket, pg, proxy, args.predictions, args.paced_rate)
        seconds["store_requests"], t = time.perf_counter() - t, time.perf_counter()
        m3 = drift_read_times(pg, legacy, endpoint, bucket, work, args.sizes, args.s3_sizes, args.last)
        seconds["drift_read"] = time.perf_counter() - t

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "uptime_at_start": uptime},
        "quick": args.quick, "model": args.registry or args.model, "images": {"from": images_from, "n": len(images)},
        "concurrency": args.concurrency, "seconds_per_row": args.seconds, "legacy_commit": args.legacy_commit,
        "seconds": seconds, "predict_throughput": m1, "store_requests": m2, "drift_read": m3,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(tables(result))
    return result


if __name__ == "__main__":
    main()
