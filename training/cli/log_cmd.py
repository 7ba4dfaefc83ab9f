"""`cnnloop log info|import-s3`: what the prediction log holds, and moving a pre-SQL S3 log into it; needs no torch."""
from __future__ import annotations

import typer
from rich.console import Console

from training.cli.common import (DATA_DIR_OPTION, LOG_URL_OPTION, S3_ENDPOINT_OPTION, emit_json, fail, guarded,
                                 store_locations)

app = typer.Typer(help="Inspect the prediction log, or move a log written before the SQL log into it.",
                  no_args_is_help=True)
console = Console(stderr=True)
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout for scripts.")


def _open(data_dir: str | None, s3_endpoint_url: str | None, log_url: str | None, s3_only: bool = False):
    from pathlib import Path

    from exporters.prediction_log.sql import open_prediction_log

    locations = store_locations(None, s3_endpoint_url, data_dir, log_url, with_log=True)
    if s3_only and not locations.data_is_s3:
        fail(f"--data-dir {locations.data_dir} is not an s3:// data dir; only S3 logs used the old layout")
    if not locations.data_is_s3 and not locations.log_url and not Path(locations.data_dir).is_dir():
        fail(f"data dir {locations.data_dir} does not exist; point --data-dir (CNNLOOP_DATA_DIR) at the service's data dir")
    return locations, open_prediction_log(locations.data_dir, locations.s3_endpoint_url, locations.log_url)


@app.command("info")
def info_command(data_dir: str = DATA_DIR_OPTION, s3_endpoint_url: str = S3_ENDPOINT_OPTION, log_url: str = LOG_URL_OPTION,
                 json_out: bool = JsonOpt) -> None:
    """Where the log is and what it holds: predictions, labeled predictions, unstored-image feedback, schema version."""
    from exporters.prediction_log.schema import stored_version

    with guarded():
        locations, log = _open(data_dir, s3_endpoint_url, log_url)
        try:
            labeled, agreed = log.feedback_summary()
            with log.engine.connect() as conn:
                version = stored_version(conn)
            out = {"database": log.describe(), "images": locations.data_dir, "schema_version": version,
                   "predictions": log.count_predictions(), "labeled_predictions": labeled,
                   "labeled_predicted_right": agreed, "feedback_without_image": log.feedback_without_image(),
                   "labeled_examples": sum(1 for _ in log.labeled_examples())}
        finally:
            log.close()
    if json_out:
        return emit_json(out)
    for key, value in out.items():
        console.print(f"{key.replace('_', ' ')}: {value}", highlight=False)


@app.command("import-s3")
def import_s3_command(data_dir: str = DATA_DIR_OPTION, s3_endpoint_url: str = S3_ENDPOINT_OPTION,
                      log_url: str = LOG_URL_OPTION, json_out: bool = JsonOpt) -> None:
    """Move an S3 log written before the SQL log into the database CNNLOOP_LOG_URL names.

    That layout kept one object per record under predictions/, feedback/ and labeled/.

    Images stay where they are. Records already in the database are skipped, so an interrupted
    import is finished by running it again; the old objects are left in place (delete them when
    `cnnloop log info` shows the counts you expect)."""
    from exporters.prediction_log.legacy_s3 import import_legacy_s3_log
    from training.progress import make_progress

    with guarded():
        locations, log = _open(data_dir, s3_endpoint_url, log_url, s3_only=True)
        try:
            store = log.images
            total = len(store.list("predictions"))
            with make_progress(console, enabled=not json_out) as bar:
                task = bar.add_task("importing predictions", total=total)
                counts = import_legacy_s3_log(store, log, progress=lambda n: bar.advance(task, n))
        finally:
            log.close()
    if json_out:
        return emit_json(counts.as_dict())
    console.print(f"imported {counts.predictions} prediction(s), {counts.feedback_events} feedback event(s), "
                  f"{counts.labeled_uploads} labeled upload(s); {counts.skipped} already in the database", highlight=False)
