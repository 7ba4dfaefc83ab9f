"""A service as a child process: a free port, a bounded wait on /readyz, a clean stop.

The demo starts `cnnloop serve` with these; the service tests start `bentoml serve` with the same
three helpers. The child gets its own process group; a stop is SIGTERM first (in-flight requests
drain), SIGKILL to the whole process tree if that hangs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import psutil

from training.errors import TrainingError

LOG_TAIL_CHARS = 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The child and its live descendants. BentoML's worker runs in a process group of its own, so a
    signal to the arbiter's group never reaches it: only the tree does."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_process_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the child and every descendant at once, as the OOM killer or a lost node does: no drain.
    Returns the processes still alive 30 s later (none, unless one is stuck in the kernel)."""
    tree = _tree(proc)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(tree, timeout=30)
    proc.poll()  # reap it, so Popen knows it is gone
    return alive


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (in-flight requests and the log queue drain), SIGKILL to the
    whole tree if it hangs; a worker left behind by its arbiter gets a short grace, then SIGKILL."""
    if proc.poll() is not None:
        return
    tree = _tree(proc)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc)
        return
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def _log_tail(log: Path | Callable[[], str]) -> str:
    if callable(log):
        return log()[-LOG_TAIL_CHARS:]
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"its log: {log}\n{text[-LOG_TAIL_CHARS:]}"


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float, log: Path | Callable[[], str],
                     ready_path: str = "/readyz", what: str = "the service") -> None:
    """Return once `url` + `ready_path` answers 200; TrainingError with the tail of `log` (its file, or a
    function returning its text) if `process` exits first or `timeout_s` passes. Stopping it is the caller's."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise TrainingError(f"{what} exited with code {process.returncode} while starting; {_log_tail(log)}")
        try:
            if httpx.get(url + ready_path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TrainingError(f"{what} was not ready within {timeout_s:.0f}s; {_log_tail(log)}")
        time.sleep(0.5)


@dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def stop(self) -> None:
        stop_process_group(self.process)


def start_service(settings: dict[str, str], log_path: Path, timeout_s: float = 180) -> ServiceProcess:
    """`cnnloop serve` with CNNLOOP_<KEY>=value for each setting; returns once /readyz answers 200."""
    cli = shutil.which("cnnloop", path=str(Path(sys.executable).parent)) or shutil.which("cnnloop")
    if cli is None:
        raise TrainingError("the `cnnloop` command is not on PATH; install the project (`pip install -e .`)")
    port = free_port()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **{f"CNNLOOP_{k.upper()}": str(v) for k, v in settings.items()}}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([cli, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    service = ServiceProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until_ready(service.url, proc, timeout_s, log_path)
    except BaseException:
        service.stop()
        raise
    return service
