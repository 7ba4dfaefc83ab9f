"""What the HTTP stack alone costs per /predict-shaped request, with no model behind it.

The same two Starlette routes, served three ways, each pinned to one core and driven by `wrk` on
the other (bench/wrk_multipart.lua: one hymenoptera val JPEG per multipart request):
  - `/form` reads the multipart form as cnnloop's /predict does (starlette + python-multipart);
  - `/body` only reads the raw body: the difference is what multipart parsing costs;
servers:
  - BentoML as cnnloop configures it (`tracing.excluded_urls` "." : the OpenTelemetry middleware skipped);
  - BentoML's defaults (the OpenTelemetry middleware builds a span for every request);
  - bare uvicorn + Starlette (no BentoML middleware), the floor.
Each row: requests/s and the server's CPU per request (its CPU seconds over its requests), rounds
interleaved so load drifts hit every contender alike. Set beside the service's CPU per image
(bench/serve_wrk.py) it says how much of a request no change inside cnnloop can remove.

    python bench/http_overhead.py [--seconds 8] [--rounds 2]

Needs `wrk` on PATH and 2 cores. Results: bench/results/http_overhead.json and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import DATA  # noqa: E402
from bench.serve_wrk import jpeg_list, run_wrk  # noqa: E402
from training.demo.service_process import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "http_overhead.json"

# Written to a temp dir and served from there: the project keeps BentoML code in service/ only.
APP = '''
import json, os
import bentoml
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

ANSWER = {"model_version": "v", "predictions": [{"prediction_id": "0" * 32, "label": "ants", "confidence": 0.9}]}

async def form(request):
    form = await request.form(max_files=64, max_fields=32, max_part_size=64 * 1024)
    n = len(await form.getlist("images")[0].read())
    await form.close()
    return JSONResponse({**ANSWER, "n": n})

async def body(request):
    return JSONResponse({**ANSWER, "n": len(await request.body())})

app = Starlette(routes=[Route("/form", form, methods=["POST"]), Route("/body", body, methods=["POST"])])

@bentoml.service(name="echo", workers=1, **json.loads(os.environ.get("ECHO_SERVICE_CONFIG", "{}")))
@bentoml.asgi_app(app, path="/")
class Echo:
    pass
'''

SERVERS = {
    "BentoML, cnnloop's config (no OTel span)": ("bentoml", {"tracing": {"excluded_urls": "."}}),
    "BentoML defaults (OTel span per request)": ("bentoml", {}),
    "uvicorn + Starlette, no BentoML": ("uvicorn", None),
}


def start(kind: str, config: dict | None, workdir: Path, port: int, core: int) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    if kind == "bentoml":
        command = [str(bin_dir / "bentoml"), "serve", "echo_app:Echo", "--port", str(port)]
    else:
        command = [str(bin_dir / "uvicorn"), "echo_app:app", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(workdir / "bentoml_home"),
           "ECHO_SERVICE_CONFIG": json.dumps(config or {})}
    log = open(workdir / f"{kind}.log", "ab")
    proc = subprocess.Popen(["taskset", "-c", str(core), *command], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}; see {workdir / (kind + '.log')}")
        try:
            if httpx.post(f"http://127.0.0.1:{port}/body", content=b"x", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{kind} did not answer within 90 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


def measure(name: str, kind: str, config, workdir: Path, file_list: Path, args, cpus: list[int]) -> list[dict]:
    port = free_port()
    proc = start(kind, config, workdir, port, cpus[0])
    try:
        rows = []
        for route in ("form", "body"):
            url = f"http://127.0.0.1:{port}/{route}"
            run_wrk(url, file_list, args.concurrency, 2, {cpus[1]}, proc.pid)  # warm-up
            r = run_wrk(url, file_list, args.concurrency, args.seconds, {cpus[1]}, proc.pid)
            ok = r["requests"] - r["failures"]
            rows.append({"server": name, "route": route, "requests_per_s": r["images_per_s"], "failures": r["failures"],
                         "server_cpu_us_per_request": r["server_cpu_s"] / max(ok, 1) * 1e6})
            print(f"  {name} /{route}: {r['images_per_s']:.0f} req/s, "
                  f"{rows[-1]['server_cpu_us_per_request']:.0f} us CPU per request", file=sys.stderr)
        return rows
    finally:
        stop(proc)


def table(result: dict) -> str:
    import statistics

    floor = {route: statistics.median(r["server_cpu_us_per_request"] for r in result["rows"]
                                      if r["route"] == route and "no BentoML" in r["server"])
             for route in ("form", "body")}
    lines = ["| server | route | req/s (median) | server CPU per request, us (median) | vs bare uvicorn |",
             "|---|---|---:|---:|---:|"]
    for name in SERVERS:
        for route in ("form", "body"):
            rows = [r for r in result["rows"] if r["server"] == name and r["route"] == route]
            cpu = statistics.median(r["server_cpu_us_per_request"] for r in rows)
            rps = statistics.median(r["requests_per_s"] for r in rows)
            lines.append(f"| {name} | /{route} | {rps:.0f} | {cpu:.0f} | {cpu / floor[route]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=DATA / "val")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the three servers")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on PATH: apt-get install wrk")
    load_before = os.getloadavg()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 cores: the server on one, wrk on the other")
    with tempfile.TemporaryDirectory(prefix="cnnloop-bench-http-") as tmp:
        work = Path(tmp)
        (work / "echo_app.py").write_text(APP)
        file_list = jpeg_list(args.images, work / "files.txt")
        rows = []
        for _ in range(args.rounds):
            for name, (kind, config) in SERVERS.items():
                rows.extend(measure(name, kind, config, work, file_list, args, cpus))
    result = {"load_before": load_before, "concurrency": args.concurrency, "seconds_per_row": args.seconds,
              "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
