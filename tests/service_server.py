"""Fixtures for the service tests: a real `bentoml serve` on a free port, a published model, Prometheus.

Servers are subprocesses with a bounded wait on /readyz and are always stopped (SIGTERM, then
SIGKILL). CPU is scarce: test modules share one server each.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from training.demo.service_process import free_port, stop_process_group, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90
API_TOKEN = "test-api-token-0123456789"
PREDICT_TOKEN = "test-predict-token-0123456789"


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen
    log_path: Path

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process_group(self.process)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False


@contextlib.contextmanager
def serve(env: dict[str, str], log_path: Path, target: str = "service.service:CnnloopService",
          via_cli: bool = False, root: Path = ROOT) -> Iterator[RunningService]:
    """`bentoml serve TARGET` (or `cnnloop serve`) on a free port with `env` added; yields once /readyz is 200.
    `root`: the checkout whose code serves (benchmarks compare two)."""
    port = free_port()
    address = ["--port", str(port), "--host", "127.0.0.1"]
    if via_cli:
        command = [str(Path(sys.executable).parent / "cnnloop"), "serve", *address]
    else:
        command = [sys.executable, "-m", "bentoml", "serve", target, *address]
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(log_path.parent / "bentoml_home"),
                "PYTHONPATH": str(root), **env}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    running = RunningService(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until_ready(running.url, proc, START_TIMEOUT_S, log_path)
        yield running
    finally:
        stop_process_group(proc)


def service_env(registry: Path | str, data_dir: Path | str, **settings) -> dict[str, str]:
    env = {"CNNLOOP_REGISTRY": str(registry), "CNNLOOP_DATA_DIR": str(data_dir), "CNNLOOP_POLL_INTERVAL_S": "1",
           "CNNLOOP_BUNDLE_CACHE_DIR": str(Path(data_dir).parent / (Path(data_dir).name + "-bundles"))}
    env.update({f"CNNLOOP_{k.upper()}": str(v) for k, v in settings.items()})
    return env


# Prometheus ----------------------------------------------------------------------------------

def ensure_prometheus() -> str | None:
    """Path of the prometheus binary, installing the Debian package if missing (needs root + apt)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"], env=env,
                   capture_output=True, timeout=900)
    return shutil.which("prometheus")


@contextlib.contextmanager
def prometheus_scraping(binary: str, target_url: str, workdir: Path) -> Iterator[str]:
    """A Prometheus server scraping `target_url`/metrics every second; yields its base URL."""
    host = target_url.split("://", 1)[1]
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cnnloop\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{host}']\n"
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, 60, log_path, ready_path="/-/ready", what="prometheus")
        yield url
    finally:
        stop_process_group(proc)


# a published model ---------------------------------------------------------------------------

def export_and_publish(run_dir: Path, registry_uri: str, variants: str = "int8", promote: str | None = None) -> str:
    """`cnnloop export RUN_DIR --registry URI` in-process; returns the new version id."""
    import typer
    from typer.testing import CliRunner

    from training.cli import export_cmd

    app = typer.Typer()
    app.callback()(lambda: None)  # keep `export` a named subcommand
    export_cmd.register(app)
    args = ["export", str(run_dir), "--registry", registry_uri, "--variants", variants]
    if promote:
        args += ["--promote", promote]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"cnnloop export failed ({result.exit_code}): {result.output}\n{result.exception!r}")
    return result.stdout.strip().splitlines()[-1]


@dataclass
class PublishedModel:
    registry: Path
    run_dir: Path
    data_dir: Path  # the digits ImageFolder the model was trained on
    version: str
    classes: list[str]


def publish_digits_model(root: Path) -> PublishedModel:
    """A tiny digits model (0, 1, 7 at 64 px), trained in seconds, published and promoted to production."""
    from tests.training_data import fast_config, make_digits
    from training.train import train

    data = make_digits(root / "digits", digits=(0, 1, 7), per_class=30)
    train(data, root / "run", fast_config(epochs=2, strategy="finetune", lr=3e-3), show_progress=False)
    registry = root / "registry"
    version = export_and_publish(root / "run", str(registry), promote="production")
    return PublishedModel(registry, root / "run", data, version, ["0", "1", "7"])


_built: dict[str, PublishedModel] = {}


@pytest.fixture(scope="session")
def published_model(tmp_path_factory) -> PublishedModel:
    """Built once per test process, whichever module asks first (modules import this fixture)."""
    if "digits" not in _built:
        _built["digits"] = publish_digits_model(tmp_path_factory.mktemp("service_model"))
    return _built["digits"]
