"""The service measured with a load generator that costs almost no CPU: Debian's `wrk`.

bench/serve.py drives the service from Python (aiohttp), which shares the two cores with the
server and so takes its throughput away. Here `wrk` (C, one thread) posts multipart JPEGs
(bench/wrk_multipart.lua: one hymenoptera val photo per request, as `curl -F images=@x.jpg`), and
each row reports the CPU the client and the server spent, as a share of the cores they ran on.
Beside every service row, measured in the same process run:
  - the in-process limit on the same cores: decode + preprocess + ONNX Runtime with no HTTP, at its
    best batch size and threading (bench/serve.py's in_process_limit);
  - the in-process single-image latency: decode + preprocess + one ORT call at batch 1 (p50), what
    a request at concurrency 1 cannot go below;
  - at the top concurrency on all cores, the Python load generator as a cross-check.
Core counts: `--cores 1 2` runs the service and the limit pinned (sched_setaffinity, as taskset
does) to the first N cores; the client runs on the remaining core when there is one, else shares.

    python bench/serve_wrk.py [--registry URI] [--seconds 12] [--concurrency 1 8 32] [--cores 1 2]

Needs `wrk` on PATH (apt-get install wrk). Results: bench/results/serve_wrk.json and a markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
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
    """One closed-loop wrk run; latency percentiles from wrk, CPU of client and server from the OS."""
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
    failures = w["status_errors"] + w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    return {"concurrency": concurrency, "requests": w["requests"], "failures": failures,
            "images_per_s": (w["requests"] - w["status_errors"]) / (w["duration_us"] / 1e6),
            "p50_ms": w["p50_us"] / 1000, "p95_ms": w["p95_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "wall_s": wall}


def single_image_latency(registry_uri: str, images: list[tuple[str, bytes]], workdir: Path, n: int = 300) -> dict:
    """p50/p95 of decode + preprocess + one single-threaded ORT call at batch 1, one image at a time."""
    from exporters.onnx_runtime import load_bundle_model
    from exporters.preprocess import load_model_input
    from exporters.model_store.registry import Registry

    bundle = Registry.open(registry_uri).fetch("production", workdir / "latency_bundle")
    model, fetched = load_bundle_model(bundle, threads=1)
    times = []
    for i in range(n + 20):
        t = time.perf_counter()
        model.run(load_model_input(images[i % len(images)][1], fetched.policy)[None])
        times.append(time.perf_counter() - t)
    shutil.rmtree(workdir / "latency_bundle", ignore_errors=True)
    ms = np.array(times[20:]) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def measure_at(cores: list[int], client_cpus: set[int], registry: str, images, file_list: Path, work: Path,
               args) -> dict:
    from tests.service_server import serve, service_env

    all_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))  # the limit, the latency and the server (inherited) run on these
    try:
        limit = in_process_limit(registry, images, work, seconds=3.0)
        latency = single_image_latency(registry, images, work)
        with serve(service_env(registry, work / f"data{len(cores)}", poll_interval_s=0, store_sample_rate=1.0),
                   work / f"cnnloop{len(cores)}.log") as svc:
            os.sched_setaffinity(0, all_cpus)
            info = svc.client().get("/info").json()
            url = svc.url + "/predict"
            run_wrk(url, file_list, max(args.concurrency), args.warmup, client_cpus, svc.process.pid)  # warm-up
            rows = []
            for c in args.concurrency:
                row = run_wrk(url, file_list, c, args.seconds, client_cpus, svc.process.pid)
                row["client_cpu_share"] = row["client_cpu_s"] / (row["wall_s"] * len(client_cpus))
                row["server_cpu_share"] = row["server_cpu_s"] / (row["wall_s"] * len(cores))
                print(f"  {len(cores)} core(s) wrk c={c}: {row['images_per_s']:.1f} img/s, p50 {row['p50_ms']:.1f} ms, "
                      f"client CPU {row['client_cpu_share']:.1%}, server CPU {row['server_cpu_share']:.1%}, "
                      f"failures {row['failures']}", file=sys.stderr)
                rows.append(row)
            python_row = None
            if args.python_check and set(cores) == all_cpus:
                c = max(args.concurrency)
                python_row = asyncio.run(closed_loop(url, "images", images, c, args.seconds, args.warmup,
                                                     encode=multipart("images")))
                print(f"  python client c={c}: {python_row['images_per_s']:.1f} img/s", file=sys.stderr)
    finally:
        os.sched_setaffinity(0, all_cpus)
    return {"cores": cores, "client_cpus": sorted(client_cpus), "threads": info.get("threads"),
            "in_process_limit": {k: limit[k] for k in ("images_per_s", "best", "all")},
            "single_image_latency": latency, "wrk": rows, "python_client": python_row}


def table(result: dict) -> str:
    lines = ["| cores | concurrency | cnnloop img/s (wrk) | p50 / p95 / p99 ms | client CPU | server CPU "
             "| in-process limit img/s | cnnloop / limit | p50 / single-image latency |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        limit = run["in_process_limit"]["images_per_s"]
        single = run["single_image_latency"]["p50_ms"]
        for r in run["wrk"]:
            # Only a lone request can be held to the single-image latency; under load it queues.
            vs_single = f"{r['p50_ms'] / single:.2f}x ({single:.1f} ms)" if r["concurrency"] == 1 else "-"
            lines.append(f"| {len(run['cores'])} | {r['concurrency']} | {r['images_per_s']:.1f} "
                         f"| {r['p50_ms']:.1f} / {r['p95_ms']:.1f} / {r['p99_ms']:.1f} | {r['client_cpu_share']:.1%} "
                         f"| {r['server_cpu_share']:.0%} | {limit:.1f} | {r['images_per_s'] / limit:.2f}x "
                         f"| {vs_single} |")
        if run["python_client"]:
            p = run["python_client"]
            lines.append(f"| {len(run['cores'])} | {p['concurrency']} (Python client) | {p['images_per_s']:.1f} "
                         f"| {p['p50_ms']:.1f} / {p['p95_ms']:.1f} / {p['p99_ms']:.1f} | - | - | {limit:.1f} "
                         f"| {p['images_per_s'] / limit:.2f}x | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", help="registry whose 'production' model to serve (default: train one)")
    ap.add_argument("--images", type=Path, default=DATA / "val")
    ap.add_argument("--seconds", type=float, default=12.0, help="measured seconds per row")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="run the service on the first N cores")
    ap.add_argument("--no-python-check", dest="python_check", action="store_false")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH: apt-get install wrk")
    cpus = sorted(os.sched_getaffinity(0))
    for n in args.cores:
        if not 1 <= n <= len(cpus):
            raise SystemExit(f"--cores {n}: this process may use {len(cpus)} core(s)")

    images = load_jpegs(args.images)
    with tempfile.TemporaryDirectory(prefix="cnnloop-bench-wrk-") as tmp:
        work = Path(tmp)
        file_list = jpeg_list(args.images, work / "files.txt")
        registry = args.registry or prepare_model(work)[0]
        runs = []
        for n in args.cores:
            cores = cpus[:n]
            client = set(cpus[n:]) or set(cpus)  # a spare core for wrk when there is one
            runs.append(measure_at(cores, client, registry, images, file_list, work, args))
    result = {"machine": {"cpus": len(cpus), "platform": platform.platform(), "python": platform.python_version(),
                          "load_before": os.getloadavg()},
              "images": {"folder": str(args.images), "n": len(images)}, "seconds_per_row": args.seconds,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
