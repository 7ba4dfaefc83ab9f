"""What one request costs the service in CPU, and where it goes: per thread role and per stage.

Throughput on this machine swings ±10% from run to run; CPU time per request does not. Each
contender is a `bentoml serve` of the cnnloop service with `cpu_stages` on (service/cpu_stages.py),
pinned to the first core, with Debian's `wrk` on the other core posting hymenoptera val photos
closed-loop. Per row: the server process's CPU (rusage of the whole tree) divided by the requests
served, and the diff of GET /info's "cpu" snapshot before and after: CPU by thread role (event loop,
decode, inference, log writer, ...) and by stage (decode.image, loop.records, ...).

`--server-cores 2` pins the servers to both cores of a 2-core machine; wrk then shares them.

Contenders run interleaved (round 1: A B, round 2: B A, ...) and each cell reports the median and
the spread (min-max) of its rounds. A contender is a checkout of the code and settings:
    --tree NAME=PATH        a git checkout (e.g. `git worktree add /tmp/before HEAD~1`); default: this one
    --variant NAME:K=V,...  settings on top of the tree's (CNNLOOP_K=V), e.g. nolog:log_predictions=false;
                            a key env.NAME sets that environment variable as given (BentoML's own config)

    python bench/request_cost.py [--registry URI] [--routes predict oip-pixels] [--concurrency 32]
        [--seconds 10] [--rounds 5] [--tree before=/tmp/before --tree after=.] [--variant ...]

Results: bench/results/request_cost.json (or --out) and a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import DATA, decoded, load_jpegs, oip_pixels, prepare_model  # noqa: E402
from bench.serve_wrk import run_wrk  # noqa: E402

PATHS = {"predict": "/predict", "oip-pixels": "/v2/models/cnnloop/infer"}
RESULTS = ROOT / "bench" / "results" / "request_cost.json"


def body_list(route: str, folder: Path, work: Path) -> tuple[Path, list[dict]]:
    """(the list bench/wrk_multipart.lua reads, the same requests as httpx arguments for one_pass):
    JPEGs as multipart uploads, or prepared OIP pixel bodies with their headers."""
    out = work / f"{route}.list"
    if route == "predict":
        paths = sorted(folder.rglob("*.jpg"))
        out.write_text("\n".join(map(str, paths)) + "\n")
        return out, [{"files": {"images": (p.name, p.read_bytes(), "image/jpeg")}} for p in paths]
    lines, requests = [], []
    for i, (name, pixels) in enumerate(decoded(load_jpegs(folder))):
        body, headers = oip_pixels(name, pixels)
        path = work / f"oip-{i}.bin"
        path.write_bytes(body)
        lines.append(f"{path}\t{headers['Content-Type']}\tInference-Header-Content-Length: "
                     f"{headers['Inference-Header-Content-Length']}")
        requests.append({"content": body, "headers": headers})
    out.write_text("\n".join(lines) + "\n")
    return out, requests


def cpu_snapshot(url: str) -> dict | None:
    """GET /info's "cpu"; None from code that predates cpu_stages (its rows then have the process total only)."""
    return httpx.get(url + "/info", timeout=30).json().get("cpu")


def per_request_ms(before: dict | None, after: dict | None, served: int) -> dict:
    """CPU ms per served request: by thread role, by stage, and the process's rest."""
    if before is None or after is None:
        return {"roles": {}, "stages": {}}
    roles = {r: (after["threads"].get(r, 0.0) - before["threads"].get(r, 0.0)) * 1000 / served
             for r in after["threads"]}
    stages = {s: (v["seconds"] - before["stages"].get(s, {"seconds": 0.0})["seconds"]) * 1000 / served
              for s, v in after["stages"].items()}
    process = (after["process_seconds"] - before["process_seconds"]) * 1000 / served
    return {"process": process, "roles": roles, "stages": stages,
            "unattributed": process - sum(roles.values())}


def measure(contender: dict, route: str, url: str, pid: int, args, bodies: Path, client_cpus: set[int]) -> dict:
    before = cpu_snapshot(url)
    row = run_wrk(url + PATHS[route], bodies, args.concurrency, args.seconds, client_cpus, pid)
    after = cpu_snapshot(url)
    if row["served"] == 0:
        raise RuntimeError(f"{contender['name']}: no request succeeded")
    row.update(per_request_ms(before, after, row["served"]))
    row["tree_ms"] = row["cpu_ms_per_request"]  # the whole process tree (BentoML's arbiter included)
    return row


def one_pass(url: str, route: str, requests: list[dict], pid: int) -> dict:
    """Every request of the list once, 8 at a time, on a server that has seen none of them: every image
    is new to its store, so the per-request CPU includes storing each one (the pixel route's lossless
    encode runs on the log writer's threads). Rows of the load runs repeat images, which the store
    keeps once."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.serve_wrk import tree_cpu_seconds

    before, cpu0 = cpu_snapshot(url), tree_cpu_seconds(pid)
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda request: client.post(url + PATHS[route], **request).status_code, requests))
    httpx.post(url + "/admin/reload", timeout=30)  # a round trip after the last answer
    time.sleep(1.0)  # the log writer's batch closes within log_flush_interval_ms (200 ms)
    after, cpu1 = cpu_snapshot(url), tree_cpu_seconds(pid)
    served = sum(code == 200 for code in codes)
    out = per_request_ms(before, after, served)
    out.update(requests=len(codes), served=served, tree_ms=(cpu1 - cpu0) * 1000 / served)
    print(f"first pass {route}: {served} new images, {out['tree_ms']:.2f} ms CPU/request, "
          f"log image threads {out['roles'].get('log_images', 0):.2f} ms", file=sys.stderr)
    return out


def _median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: list[dict]) -> dict:
    keys = ["images_per_s", "p50_ms", "p99_ms", "tree_ms", "process", "unattributed"]
    out = {k: _median_spread([r[k] for r in rows]) for k in keys if k in rows[0]}
    out["failures"] = sum(r["failures"] for r in rows)
    for part in ("roles", "stages"):
        names = sorted({n for r in rows for n in r[part]})
        out[part] = {n: _median_spread([r[part].get(n, 0.0) for r in rows]) for n in names}
    return out


def contenders(args) -> list[dict]:
    trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {"this": str(ROOT)}
    variants = [("", {})]
    for v in args.variant:
        name, _, settings = v.partition(":")
        variants.append((name, dict(kv.split("=", 1) for kv in settings.split(",") if kv)))
    return [{"name": f"{tree}{'+' + vname if vname else ''}", "root": Path(path).resolve(), "settings": settings}
            for tree, path in trees.items() for vname, settings in variants]


def table(result: dict) -> str:
    names = list(result["summary"])
    s = {n: result["summary"][n] for n in names}
    fmt = lambda d: f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"  # noqa: E731
    lines = ["| CPU ms per request, median (min-max) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    lines.append("| img/s | " + " | ".join(f"{s[n]['images_per_s']['median']:.1f}" for n in names) + " |")
    lines.append("| p50 / p99 ms | " + " | ".join(f"{s[n]['p50_ms']['median']:.1f} / {s[n]['p99_ms']['median']:.1f}"
                                                   for n in names) + " |")
    lines.append("| **server process, all of it** | " + " | ".join(f"**{fmt(s[n]['tree_ms'])}**" for n in names) + " |")
    for part in ("roles", "stages"):
        keys = sorted({k for n in names for k in s[n][part]}, key=lambda k: -s[names[0]][part].get(k, {"median": 0})["median"])
        for k in keys:
            label = f"thread: {k}" if part == "roles" else f"stage: {k}"
            lines.append(f"| {label} | " + " | ".join(fmt(s[n][part][k]) if k in s[n][part] else "-" for n in names) + " |")
    lines.append("| not in a registered thread (BentoML's own, exits) | "
                 + " | ".join(fmt(s[n]["unattributed"]) if "unattributed" in s[n] else "-" for n in names) + " |")
    lines.append("| failures | " + " | ".join(str(s[n]["failures"]) for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from tests.service_server import serve, service_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", help="registry whose 'production' model to serve (default: train one)")
    ap.add_argument("--images", type=Path, default=DATA / "val")
    ap.add_argument("--routes", nargs="+", choices=sorted(PATHS), default=["predict"],
                    help="routes to load, each a cell of every contender (oip-pixels: UINT8 [1,H,W,3] binary)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of a checkout to serve (repeatable)")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... settings (repeatable)")
    ap.add_argument("--server-cores", type=int, default=1,
                    help="cores the servers are pinned to (the first N); wrk gets the rest, or shares when none is left")
    ap.add_argument("--first-pass", action="store_true",
                    help="first send every image once, 8 at a time, to each fresh server: the cost of storing new images")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH: apt-get install wrk")
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= args.server_cores <= len(cpus):
        raise SystemExit(f"--server-cores {args.server_cores}: this process may use {len(cpus)} core(s)")
    server_cpus = set(cpus[:args.server_cores])
    client_cpus = set(cpus[args.server_cores:]) or set(cpus)
    runs = contenders(args)
    with tempfile.TemporaryDirectory(prefix="cnnloop-request-cost-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        registry = args.registry or prepare_model(work)[0]
        lists = {route: body_list(route, args.images, work) for route in args.routes}
        bodies = {route: path for route, (path, _) in lists.items()}
        servers = {}
        all_cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, server_cpus)  # the servers inherit it
        try:
            for c in runs:
                settings = {k: v for k, v in c["settings"].items() if not k.startswith("env.")}
                env = service_env(registry, work / f"data-{c['name']}", poll_interval_s=0, store_sample_rate=1.0,
                                  cpu_stages="true", **settings)
                env.update({k[4:]: v for k, v in c["settings"].items() if k.startswith("env.")})
                servers[c["name"]] = stack.enter_context(serve(env, work / f"{c['name']}.log", root=c["root"]))
        finally:
            os.sched_setaffinity(0, all_cpus)
        cells = [(c, route) for route in args.routes for c in runs]
        first_pass = {}
        for c, route in cells if args.first_pass else ():
            svc = servers[c["name"]]
            first_pass[f"{c['name']} {route}"] = one_pass(svc.url, route, lists[route][1], svc.process.pid)
        for c, route in cells:  # warm-up: first requests load lazily imported code and grow the pools
            svc = servers[c["name"]]
            run_wrk(svc.url + PATHS[route], bodies[route], args.concurrency, 3, client_cpus, svc.process.pid)
        name = lambda c, route: c["name"] if len(args.routes) == 1 else f"{c['name']} {route}"  # noqa: E731
        rows = {name(c, route): [] for c, route in cells}
        for r in range(args.rounds):
            for c, route in (cells if r % 2 == 0 else cells[::-1]):
                svc = servers[c["name"]]
                row = measure(c, route, svc.url, svc.process.pid, args, bodies[route], client_cpus)
                rows[name(c, route)].append(row)
                print(f"round {r + 1} {name(c, route)}: {row['images_per_s']:.1f} img/s, {row['tree_ms']:.2f} ms "
                      f"CPU/request, failures {row['failures']}", file=sys.stderr)
    result = {"machine": {"cpus": len(cpus), "platform": platform.platform(), "load_before": os.getloadavg()},
              "when": time.strftime("%Y-%m-%d %H:%M"), "routes": args.routes, "server_cores": args.server_cores, "concurrency": args.concurrency,
              "seconds_per_row": args.seconds, "rounds": args.rounds,
              "contenders": [{**c, "root": str(c["root"])} for c in runs],
              "summary": {n: summarize(rs) for n, rs in rows.items()}, "rows": rows, "first_pass": first_pass}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
