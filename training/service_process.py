"""Start `cnnloop serve` as a child process on a free port and stop it cleanly (the demo's service).

Bounded wait on /readyz; the child gets its own process group so BentoML's arbiter and workers
stop together, SIGTERM first (in-flight requests drain), SIGKILL if that hangs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from training.errors import TrainingError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (BentoML's arbiter and workers), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def stop(self) -> None:
        stop_process_group(self.process)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TrainingError(f"the service exited with code {self.process.returncode} while starting; "
                                    f"its log: {self.log_path}\n{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TrainingError(f"the service was not ready within {timeout_s:.0f}s; its log: {self.log_path}")


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
    service.wait_ready(timeout_s)
    return service
