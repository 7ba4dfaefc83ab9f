"""cnnloop against a fair BentoML peer, driven by a load generator that costs almost no CPU: Debian's `wrk`.

bench/serve.py drives the service from Python (aiohttp), which shares the two cores with the
server and so takes its throughput away. Here `wrk` (C, one thread) posts multipart JPEGs
(bench/wrk_multipart.lua: one hymenoptera val photo per request, as `curl -F images=@x.jpg`) to:
  - cnnloop: `POST /predict` of service/, prediction log on, as shipped (tests/service_server.service_env);
  - the peer: bench/peer_bentoml.py, BentoML's documented ONNX image classifier (PIL input,
    `batchable=True, max_batch_size=32, max_latency_ms=1000`) on the same .onnx file, with the same
    model input (checked here to be bit-identical) and the same ORT threads per core.
Both servers run pinned (sched_setaffinity, as taskset does) to the first N cores, started once per
core count; only one is under load at a time. At each concurrency level, after an unmeasured
warm-up of both, each round runs both servers, cnnloop first in even rounds and the peer first in
odd ones, so drift in the machine's speed hits both alike; each cell reports the median over rounds
and the spread (min-max), the cnnloop / peer ratio paired round by round. Per row:
  - images/s: 2xx answers only. wrk counts a 503 (BentoML's batcher refusing under load) as a
    completed request: it is a failure here and no image. Failures = non-2xx + socket errors +
    answers slower than wrk's --timeout. wrk's latency percentiles include the failed answers;
  - CPU ms per request: the server's process tree CPU over the row / its 2xx answers;
Beside them, measured in the same run on the same cores:
  - the in-process limit: decode + preprocess + ONNX Runtime with no HTTP, at its best batch size
    and threading (bench/serve.py's in_process_limit);
  - the in-process single-image latency: decode + preprocess + one ORT call at batch 1 (p50), what
    a request at concurrency 1 cannot go below.
Before measuring, every val image goes once to each server: their top labels must agree.
The client runs on the cores left over when there are any, else shares them.

    python bench/serve_wrk.py [--registry URI] [--seconds 12] [--rounds 3] [--concurrency 1 8 32] [--cores 1 2]

Needs `wrk` on PATH (apt-get install wrk). Results: bench/results/serve_wrk.json and a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import DATA, closed_loop, in_process_limit, load_jpegs, multipart, prepare_model  # noqa: E402

LUA = ROOT / "bench" / "wrk_multipart.lua"
RESULTS = ROOT / "bench" / "results" / "serve_wrk.json"
SERVERS = ("cnnloop", "peer")
PEER_TARGET = "bench.peer_bentoml:PeerClassifier"


def jpeg_list(folder: Path, path: Path) -> Path:
    """The file list bench/wrk_multipart.lua reads: every JPEG under `folder`, one path per line."""
    path.write_text("\n".join(str(p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")) + "\n")
    return path


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (BentoML forks workers)."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def run_wrk(url: str, file_list: Path, concurrency: int, seconds: float, client_cpus: set[int],
            server_pid: int) -> dict:
    """One closed-loop wrk run; latency percentiles from wrk, CPU of client and server from the OS.
    `file_list`: bench/wrk_multipart.lua's list (JPEG paths, or prepared bodies)."""
    command = ["taskset", "-c", ",".join(map(str, sorted(client_cpus))),
               "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "--timeout", "60s",
               "-s", str(LUA), url, "--", str(file_list)]
    server0, client0 = tree_cpu_seconds(server_pid), os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    server_cpu = tree_cpu_seconds(server_pid) - server0
    client1 = os.times()  # wrk is reaped by now: its CPU is in this process's children times
    client_cpu = (client1.children_user - client0.children_user) + (client1.children_system - client0.children_system)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    match = re.search(r"^WRK_JSON (\{.*\})$", out, re.M)
    if not match:
        raise RuntimeError(f"wrk printed no WRK_JSON line:\n{out}\n{err}")
    w = json.loads(match.group(1))
    # wrk's `requests` counts every answer that completed: non-2xx ones and ones slower than --timeout
    # too (those are its `timeouts`); socket errors never completed and are not in it.
    served = max(0, w["requests"] - w["status_errors"] - w["timeouts"])
    failures = w["status_errors"] + w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    return {"concurrency": concurrency, "requests": w["requests"], "served": served, "failures": failures,
            "errors": {k: w[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")},
            "images_per_s": served / (w["duration_us"] / 1e6),
            "p50_ms": w["p50_us"] / 1000, "p95_ms": w["p95_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "cpu_ms_per_request": server_cpu * 1000 / served if served else None,
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "wall_s": wall}


def single_image_latency(bundle_dir: Path, images: list[tuple[str, bytes]], n: int = 300) -> dict:
    """p50/p95 of decode + preprocess + one single-threaded ORT call at batch 1, one image at a time."""
    from exporters.onnx_runtime import load_bundle_model
    from exporters.preprocess import load_model_input

    model, bundle = load_bundle_model(bundle_dir, threads=1)
    times = []
    for i in range(n + 20):
        t = time.perf_counter()
        model.run(load_model_input(images[i % len(images)][1], bundle.policy)[None])
        times.append(time.perf_counter() - t)
    ms = np.array(times[20:]) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


# the peer is the same model on the same input ---------------------------------------------------

def peer_input_check(bundle_dir: Path, images: list[tuple[str, bytes]]) -> dict:
    """The peer's model input (BentoML's PIL image through bench.peer_bentoml.model_input) against
    cnnloop's (`load_model_input` on the bytes), image by image: they must be bit-identical."""
    import io

    from PIL import Image

    from bench.peer_bentoml import model_input
    from exporters.model_store.bundle import read_bundle
    from exporters.preprocess import load_model_input

    policy = read_bundle(bundle_dir).policy
    differ = [name for name, data in images
              if not np.array_equal(load_model_input(data, policy), model_input(Image.open(io.BytesIO(data)), policy))]
    if differ:
        raise RuntimeError(f"the peer's model input differs from cnnloop's for {len(differ)} image(s): {differ[:5]}")
    return {"images": len(images), "identical": len(images)}


def top_label_check(urls: dict[str, str], images: list[tuple[str, bytes]]) -> dict:
    """Every image once to each server, one at a time: their top labels must agree."""
    import httpx

    answers: dict[str, list[tuple[str, float]]] = {name: [] for name in urls}
    with httpx.Client(timeout=60) as client:
        for name, data in images:
            for server, url in urls.items():
                r = client.post(url, files={"images": (name, data, "image/jpeg")})
                r.raise_for_status()
                body = r.json()
                top = body["predictions"][0] if server == "cnnloop" else body[0]
                answers[server].append((top["label"], top["confidence"]))
    ours, peer = answers["cnnloop"], answers["peer"]
    differ = [name for (name, _), a, b in zip(images, ours, peer) if a[0] != b[0]]
    if differ:
        raise RuntimeError(f"cnnloop and the peer disagree on the top label of {len(differ)} image(s): {differ[:5]}")
    # cnnloop serves calibrated probabilities when the bundle has a calibration; the peer the graph's.
    return {"images": len(images), "same_top_label": len(images),
            "max_confidence_difference": max(abs(a[1] - b[1]) for a, b in zip(ours, peer))}


# the interleaved rounds ---------------------------------------------------------------------

@contextlib.contextmanager
def both_servers(registry: str, bundle_dir: Path, work: Path, n_cores: int):
    """cnnloop and the peer, started with this process's current affinity (they inherit it)."""
    from tests.service_server import serve, service_env

    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(serve(service_env(registry, work / f"data{n_cores}", poll_interval_s=0,
                                                     store_sample_rate=1.0), work / f"cnnloop{n_cores}.log"))
        model = ours.client().get("/info").json()["model"]
        if model["version"] != bundle_dir.name:
            raise RuntimeError(f"cnnloop serves {model['version']}, the peer would serve {bundle_dir.name}")
        # The very file cnnloop loaded: its variant, named explicitly.
        peer = stack.enter_context(serve({"CNNLOOP_PEER_BUNDLE": str(bundle_dir), "CNNLOOP_PEER_VARIANT": model["variant"]},
                                         work / f"peer{n_cores}.log", target=PEER_TARGET))
        yield {"cnnloop": ours, "peer": peer}


def peer_batching() -> dict:
    """The peer's adaptive batching settings, as its decorator states them."""
    from bench.peer_bentoml import PeerClassifier

    api = PeerClassifier.apis["predict"]
    return {"batchable": api.batchable, "max_batch_size": api.max_batch_size, "max_latency_ms": api.max_latency_ms}


def spread(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(rows: dict[str, list[dict]]) -> dict:
    """One (cores, concurrency) cell: per server the median and spread over rounds; ratios paired by round."""
    out = {}
    for server, runs in rows.items():
        out[server] = {key: spread([r[key] for r in runs])
                       for key in ("images_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")}
        out[server]["failures"] = sum(r["failures"] for r in runs)
        out[server]["served"] = sum(r["served"] for r in runs)
    # Paired by round: a round's two rows ran back to back, so the ratio sees less of the machine's drift.
    out["cnnloop_vs_peer"] = spread([a["images_per_s"] / b["images_per_s"] if b["images_per_s"] else None
                                     for a, b in zip(rows["cnnloop"], rows["peer"])])
    return out


def interleaved_rounds(servers: dict, file_list: Path, client_cpus: set[int], args) -> tuple[list[dict], list[dict]]:
    """(every wrk row, in the order run; one summary cell per concurrency level).

    Levels outside, rounds inside: BentoML's batcher learns how long a batch takes to gather and keeps
    holding lone requests about that long once the load drops (~50 ms on these 2 cores after c=8 or
    c=32, fading over 10 s or more), so a c=1 row right after a c=32 row measures that memory, not c=1. Each level
    starts with an unmeasured warm-up of both servers at that level."""
    urls = {name: svc.url + "/predict" for name, svc in servers.items()}
    rows: list[dict] = []
    for c in args.concurrency:
        for name in SERVERS:
            run_wrk(urls[name], file_list, c, args.warmup, client_cpus, servers[name].process.pid)
        for rnd in range(args.rounds):
            for name in (SERVERS if rnd % 2 == 0 else SERVERS[::-1]):
                row = run_wrk(urls[name], file_list, c, args.seconds, client_cpus, servers[name].process.pid)
                row.update(server=name, round=rnd)
                rows.append(row)
                cpu = row["cpu_ms_per_request"]
                print(f"  round {rnd} {name:7s} c={c:<3d} {row['images_per_s']:6.1f} img/s, p50 {row['p50_ms']:6.1f} ms, "
                      f"p99 {row['p99_ms']:6.1f} ms, CPU {cpu if cpu is None else round(cpu, 2)} ms/req, "
                      f"failures {row['failures']}", file=sys.stderr)
    cells = [{"concurrency": c, **cell({name: [r for r in rows if r["server"] == name and r["concurrency"] == c]
                                        for name in SERVERS})}
             for c in args.concurrency]
    return rows, cells


def measure_at(cores: list[int], client_cpus: set[int], registry: str, bundle_dir: Path, images, file_list: Path,
               work: Path, args, check_labels: bool) -> dict:
    all_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))  # the limit, the latency and both servers (inherited) run on these
    try:
        limit = in_process_limit(registry, images, work, seconds=3.0)
        latency = single_image_latency(bundle_dir, images)
        with both_servers(registry, bundle_dir, work, len(cores)) as servers:
            os.sched_setaffinity(0, all_cpus)
            info = servers["cnnloop"].client().get("/info").json()
            if check_labels:
                labels = top_label_check({name: svc.url + "/predict" for name, svc in servers.items()}, images)
                print(f"  top labels: cnnloop and the peer agree on {labels['same_top_label']}/{labels['images']} "
                      f"images", file=sys.stderr)
            rows, cells = interleaved_rounds(servers, file_list, client_cpus, args)
            python_row = None
            if args.python_check and set(cores) == all_cpus:
                c = max(args.concurrency)
                python_row = asyncio.run(closed_loop(servers["cnnloop"].url + "/predict", "images", images, c,
                                                     args.seconds, args.warmup, encode=multipart("images")))
                print(f"  python client, cnnloop c={c}: {python_row['images_per_s']:.1f} img/s", file=sys.stderr)
    finally:
        os.sched_setaffinity(0, all_cpus)
    for row in rows:
        row["client_cpu_share"] = row["client_cpu_s"] / (row["wall_s"] * len(client_cpus))
        row["server_cpu_share"] = row["server_cpu_s"] / (row["wall_s"] * len(cores))
    return {"cores": cores, "client_cpus": sorted(client_cpus), "threads": info.get("threads"),
            "model": {k: (info.get("model") or {}).get(k) for k in ("version", "variant")},
            "top_labels": labels if check_labels else None,
            "in_process_limit": {k: limit[k] for k in ("images_per_s", "best", "all")},
            "single_image_latency": latency, "cells": cells, "rows": rows, "python_client": python_row}


# report -------------------------------------------------------------------------------------

def _fmt(s: dict | None, digits: int = 1) -> str:
    """Median, and the min-max over rounds when they differ."""
    if s is None:
        return "-"
    median, low, high = (f"{s[k]:.{digits}f}" for k in ("median", "min", "max"))
    return median if low == high else f"{median} ({low}-{high})"


def table(result: dict) -> str:
    lines = ["| cores | c | cnnloop img/s | peer img/s | cnnloop / peer | p50 ms cnnloop / peer | p99 ms cnnloop / peer "
             "| CPU ms/request cnnloop / peer | failures cnnloop / peer | cnnloop / limit "
             "| c=1 p50 / single-image latency cnnloop / peer |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        limit = run["in_process_limit"]["images_per_s"]
        single = run["single_image_latency"]["p50_ms"]
        for cl in run["cells"]:
            ours, peer = cl["cnnloop"], cl["peer"]
            # Only a lone request can be held to the single-image latency; under load it queues.
            vs_single = "-"
            if cl["concurrency"] == 1 and ours["p50_ms"] and peer["p50_ms"]:
                vs_single = (f"{ours['p50_ms']['median'] / single:.2f}x / {peer['p50_ms']['median'] / single:.2f}x "
                             f"({single:.1f} ms)")
            vs_limit = f"{ours['images_per_s']['median'] / limit:.2f}x" if ours["images_per_s"] else "-"
            lines.append(
                f"| {len(run['cores'])} | {cl['concurrency']} | {_fmt(ours['images_per_s'])} | {_fmt(peer['images_per_s'])} "
                f"| {_fmt(cl['cnnloop_vs_peer'], 2)} | {_fmt(ours['p50_ms'])} / {_fmt(peer['p50_ms'])} "
                f"| {_fmt(ours['p99_ms'])} / {_fmt(peer['p99_ms'])} "
                f"| {_fmt(ours['cpu_ms_per_request'], 2)} / {_fmt(peer['cpu_ms_per_request'], 2)} "
                f"| {ours['failures']} / {peer['failures']} | {vs_limit} | {vs_single} |")
        if run["python_client"]:
            p = run["python_client"]
            lines.append(f"| {len(run['cores'])} | {p['concurrency']} (Python client, cnnloop) | {p['images_per_s']:.1f} "
                         f"| - | - | {p['p50_ms']:.1f} / - | {p['p99_ms']:.1f} / - | - | {p['failures']} / - "
                         f"| {p['images_per_s'] / limit:.2f}x | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", help="registry whose 'production' model to serve (default: train one)")
    ap.add_argument("--images", type=Path, default=DATA / "val")
    ap.add_argument("--seconds", type=float, default=12.0, help="measured seconds per row")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds per core count")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="unmeasured seconds of load on each server at each level before its rounds")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="run the servers on the first N cores")
    ap.add_argument("--python-check", action="store_true",
                    help="also drive cnnloop with the Python load generator at the top concurrency on all cores")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH: apt-get install wrk")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    cpus = sorted(os.sched_getaffinity(0))
    for n in args.cores:
        if not 1 <= n <= len(cpus):
            raise SystemExit(f"--cores {n}: this process may use {len(cpus)} core(s)")

    from exporters.model_store.registry import Registry

    images = load_jpegs(args.images)
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cnnloop-bench-wrk-") as tmp:
        work = Path(tmp)
        file_list = jpeg_list(args.images, work / "files.txt")
        registry = args.registry or prepare_model(work)[0]
        bundle_dir = Registry.open(registry).fetch("production", work / "peer_bundle")
        model_inputs = peer_input_check(bundle_dir, images)
        print(f"model input: the peer's is bit-identical to cnnloop's on {model_inputs['identical']} images",
              file=sys.stderr)
        runs = []
        for i, n in enumerate(args.cores):
            cores = cpus[:n]
            client = set(cpus[n:]) or set(cpus)  # a spare core for wrk when there is one
            runs.append(measure_at(cores, client, registry, bundle_dir, images, file_list, work, args,
                                   check_labels=i == 0))
    result = {"machine": {"cpus": len(cpus), "platform": platform.platform(), "python": platform.python_version(),
                          "load_before": load_before, "load_after": os.getloadavg()},
              "images": {"folder": str(args.images), "n": len(images)}, "seconds_per_row": args.seconds,
              "rounds": args.rounds, "duration_s": time.time() - started,
              "peer": {"target": PEER_TARGET, "batching": peer_batching(), "variant": runs[0]["model"]["variant"],
                       "model_input": model_inputs},
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
