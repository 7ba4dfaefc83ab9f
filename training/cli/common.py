"""What every subcommand shares: exit codes, error translation, JSON output."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console

# Exit codes mean something to scripts: 0 ok, 1 the job ran but its check failed,
# 2 bad input (flags, config, data, unknown names), 3 storage/registry unreachable or refused,
# 4 busy (another retrain run holds the lock).
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3
EXIT_BUSY = 4

err_console = Console(stderr=True)

# Where models and predictions live: the same flags, env vars, defaults and checks in every command
# (exporters.locations.StoreLocations, which the service and the retrain job extend).
REGISTRY_OPTION = typer.Option(None, "--registry", show_default=False,
                               help="Registry URI: a local folder or s3://bucket/prefix (env CNNLOOP_REGISTRY; default ./registry).")
DATA_DIR_OPTION = typer.Option(None, "--data-dir", show_default=False,
                               help="The service's prediction/feedback log and stored inputs: a local path or s3://bucket/prefix "
                               "(env CNNLOOP_DATA_DIR; default ./data/service).")
LOG_URL_OPTION = typer.Option(None, "--log-url", show_default=False,
                              help="Database of the prediction log: postgresql://user:password@host:5432/db (replicas and the "
                              "retrain job share one) or sqlite:///path (env CNNLOOP_LOG_URL, better for a password; default: "
                              "a SQLite file in a local data dir).")
S3_ENDPOINT_OPTION = typer.Option(None, "--s3-endpoint-url", show_default=False,
                                  help="S3 API endpoint of an S3-compatible store (MinIO, Ceph, moto...), http(s)://host:port "
                                  "(env CNNLOOP_S3_ENDPOINT_URL; unset: AWS_ENDPOINT_URL or AWS itself).")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def guarded() -> Iterator[None]:
    """Translate each room's exceptions into one clear line and a meaningful exit code."""
    from exporters.errors import ExportError, StorageError
    from training.errors import TrainingError
    from training.retrain.lock import LockHeld

    try:
        yield
    except LockHeld as e:
        fail(str(e), EXIT_BUSY)
    except StorageError as e:
        fail(str(e), EXIT_STORAGE)
    except (TrainingError, ExportError) as e:
        fail(str(e), EXIT_BAD_INPUT)


def store_locations(registry: str | None, s3_endpoint_url: str | None, data_dir: str | None = None, log_url: str | None = None,
                    with_log: bool = False):
    """The StoreLocations of the flags over CNNLOOP_* env over defaults; TrainingError (exit 2 under `guarded`) if bad.
    `with_log`: the command reads or writes the prediction log, so an s3:// data dir needs a log URL."""
    from exporters.locations import load_store_locations
    from training.errors import TrainingError

    given = {"registry": registry, "s3_endpoint_url": s3_endpoint_url, "data_dir": data_dir, "log_url": log_url}
    return load_store_locations(given, TrainingError, with_log=with_log)


def emit_json(obj: Any, path: str | None = None) -> None:
    """Write obj as JSON to path, or to stdout when path is '-' or None."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if path in (None, "-"):
        sys.stdout.write(text + "\n")
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
