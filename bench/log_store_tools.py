"""What bench/log_store.py measures with: the old log from git, request counters, a moto S3 server, CPU times.

Kept apart so the benchmark reads as its three measurements.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from bench.delay_proxy import DelayProxy

ROOT = Path(__file__).resolve().parents[1]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its live descendants have used so far."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def postmaster_pid(pg) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


def load_legacy_log_module(workdir: Path, commit: str):
    """exporters/prediction_log.py as it was at `commit` (S3PredictionLog, SqlitePredictionLog), imported from git.
    Commits before the prediction_log/ package (17139d7) held the whole log in that one file: the path is historical."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:exporters/prediction_log.py"],
                            capture_output=True, text=True, check=True).stdout
    path = workdir / "legacy_prediction_log.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("legacy_prediction_log", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class S3RequestCounter:
    """Every HTTP attempt a botocore S3 client sends, by (operation, area of the data dir)."""

    def __init__(self, client):
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3", self._count)

    def _count(self, request, event_name: str, **_) -> None:  # returns None: the request goes out
        path = urlsplit(request.url).path
        area = next((a for a in ("images", "predictions", "feedback", "labeled") if f"/{a}/" in path), "bucket")
        with self._lock:
            self.counts[f"{event_name.rsplit('.', 1)[-1]} {area}"] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self.counts = dict(self.counts), Counter()
        return counts


def count_statements(engine) -> Counter:
    from sqlalchemy import event

    counts: Counter[str] = Counter()
    event.listen(engine, "before_cursor_execute", lambda conn, cur, stmt, *a: counts.update([stmt.split(None, 1)[0].upper()]))
    return counts


def via_proxy(url: str, proxy: DelayProxy) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(port=proxy.port).render_as_string(hide_password=False)


@contextlib.contextmanager
def moto_s3(workdir: Path):
    """A moto S3 server in a process of its own (as a real store would be: its CPU is not the bench's GIL),
    with a fresh bucket; yields (endpoint URL, bucket name)."""
    import boto3

    from training.demo.service_process import free_port, stop_process_group, wait_until_ready

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    port, log_path = free_port(), workdir / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        # Its werkzeug server logs every request to stderr: sent to a file, never read unless it fails.
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(endpoint, proc, 60, log_path, ready_path="/moto-api/", what="moto")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint, bucket
    finally:
        stop_process_group(proc)
