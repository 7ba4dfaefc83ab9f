"""`cnnloop serve`: start the BentoML service (`bentoml serve`) with settings from flags.

Imports neither service/ nor bentoml: flags become CNNLOOP_* environment variables of a
`bentoml serve` subprocess, where service/settings.py validates them. Tokens are read from the
environment only (CNNLOOP_API_TOKEN, CNNLOOP_PREDICT_TOKEN), never from flags that `ps` would show.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

from training.cli.common import (DATA_DIR_OPTION, LOG_URL_OPTION, EXIT_BAD_INPUT, REGISTRY_OPTION, S3_ENDPOINT_OPTION, fail, guarded,
                                 store_locations)

# Flag name -> settings field; the value is passed as CNNLOOP_<FIELD>.
_SETTING_FLAGS = ("registry", "data_dir", "s3_endpoint_url", "log_url", "alias", "poll_interval_s", "batch_max_size",
                  "batch_max_latency_ms", "store_sample_rate", "max_body_bytes", "max_files", "variant")
_LOCAL_PATH_SETTINGS = ("REGISTRY", "DATA_DIR", "BUNDLE_CACHE_DIR", "CONFIG")


def _repo_root() -> Path:
    spec = importlib.util.find_spec("service")  # locates the package without importing it
    if spec is None or not spec.origin:
        fail("the cnnloop 'service' package is not installed; `pip install -e .` from the repository")
    return Path(spec.origin).resolve().parents[1]


def _absolute_local_paths(env: dict[str, str], config: Path | None) -> None:
    """Resolve every relative local path against the caller's folder, given or not.

    The BentoML worker runs in the repository root. A relative path from a flag, the env, the YAML
    file, or a default (./registry, ./data/service) must mean what it means where the user typed
    `cnnloop serve`: that is where `cnnloop drift` and `cnnloop retrain` look for the same data."""
    from exporters.errors import ExportError
    from exporters.locations import StoreLocations
    from exporters.settings_loader import read_settings_file

    in_file = read_settings_file(config, ExportError, "service config file", "pass an existing YAML file") if config else {}
    defaults = {"REGISTRY": StoreLocations.model_fields["registry"].default,
                "DATA_DIR": StoreLocations.model_fields["data_dir"].default}
    for name in _LOCAL_PATH_SETTINGS:
        value = env.get(f"CNNLOOP_{name}") or in_file.get(name.lower()) or defaults.get(name)
        if value and "://" not in str(value):
            env[f"CNNLOOP_{name}"] = str(Path(value).expanduser().resolve())


def serve_environment(flags: dict[str, object], extra: list[str], config: Path | None,
                      base: dict[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: the caller's, plus CNNLOOP_* from flags and --set KEY=VALUE."""
    env = dict(os.environ if base is None else base)
    if config is not None:
        env["CNNLOOP_CONFIG"] = str(config)
    for name, value in flags.items():
        if value is not None:
            env[f"CNNLOOP_{name.upper()}"] = str(value)
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set takes KEY=VALUE (a ServiceSettings field, e.g. top_k=5), got '{item}'", EXIT_BAD_INPUT)
        if "token" in key.lower():
            fail("tokens are read from the environment only (CNNLOOP_API_TOKEN, CNNLOOP_PREDICT_TOKEN)", EXIT_BAD_INPUT)
        env[f"CNNLOOP_{key.strip().upper()}"] = value
    _absolute_local_paths(env, config)
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return env


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        registry: str = REGISTRY_OPTION,
        data_dir: str = DATA_DIR_OPTION,
        s3_endpoint_url: str = S3_ENDPOINT_OPTION,
        log_url: str = LOG_URL_OPTION,
        config: Path = typer.Option(None, "--config", help="YAML file of service settings (keys as ServiceSettings fields)."),
        alias: str = typer.Option(None, "--alias", help="Registry alias to serve and follow (default production)."),
        poll_interval_s: float = typer.Option(None, "--poll-interval", help="Seconds between alias checks; 0 = never."),
        batch_max_size: int = typer.Option(None, "--batch-max-size", help="Most images per inference call."),
        batch_max_latency_ms: float = typer.Option(None, "--batch-max-latency-ms", help="Longest an image waits for its batch."),
        store_sample_rate: float = typer.Option(None, "--store-sample-rate", help="Fraction of predicted images stored (0..1)."),
        max_body_bytes: int = typer.Option(None, "--max-body-bytes", help="Larger requests get 413."),
        max_files: int = typer.Option(None, "--max-files", help="Most files per /predict request."),
        variant: str = typer.Option(None, "--variant", help="Bundle graph: auto, fp32, fp16, int8."),
        extra: list[str] = typer.Option([], "--set", help="Any other setting as KEY=VALUE (repeatable), e.g. --set top_k=5."),
        host: str = typer.Option("0.0.0.0", "--host", help="Interface to bind."),
        port: int = typer.Option(3000, "--port", help="Port to listen on."),
    ) -> None:
        """Serve the registry's production model over HTTP: /predict, /feedback, /info, /metrics, /readyz.

        Runs `bentoml serve` from the repository root with the settings as CNNLOOP_* environment
        variables (see service/settings.py for every one). Ctrl-C stops it.
        """
        flags = {name: value for name, value in locals().items() if name in _SETTING_FLAGS}
        if config is not None and not config.is_file():
            fail(f"--config {config} does not exist")
        with guarded():
            # The worker validates every setting again; the locations are checked here too, so a bad
            # --registry or --s3-endpoint-url exits 2 at once instead of inside `bentoml serve`.
            store_locations(registry, s3_endpoint_url, data_dir, log_url, with_log=True)
            env = serve_environment(flags, extra, config.resolve() if config else None)
        root = _repo_root()
        cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:CnnloopService",
               "--working-dir", str(root), "--host", host, "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, cwd=root)
        # SIGTERM (k8s, systemd) is passed on so BentoML drains in-flight requests before exiting.
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the child got the same SIGINT from the terminal
            code = proc.wait()
        raise typer.Exit(code)
