"""`cnnloop retrain`: one drift-gated retrain pass (what the Kubernetes CronJob runs), or a loop."""
from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from training.cli import loop_options as opt
from training.cli.common import DATA_DIR_OPTION, LOG_URL_OPTION, REGISTRY_OPTION, S3_ENDPOINT_OPTION, emit_json, err_console, guarded

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("retrain")
    def retrain_command(
        force: bool = typer.Option(False, "--force", help="Retrain now, whatever the drift report and policy say."),
        every: str = typer.Option(None, "--every", help="Run a pass every interval (30m, 1h, 1d) until interrupted, "
                                  "for a single machine; without it: one pass, then exit (what a CronJob calls)."),
        json_out: str = typer.Option(None, "--json", help="Write each pass's outcome as JSON to this path ('-': stdout)."),
        original_data: Path = typer.Option(None, "--original-data", help="Folder now holding the original training data, "
                                           "if it moved since the first run (env CNNLOOP_ORIGINAL_DATA)."),
        work_dir: Path = typer.Option(None, "--work-dir", help="Local scratch for fetched bundles, feedback images and "
                                      "challenger runs (env CNNLOOP_WORK_DIR; default ./data/retrain)."),
        epochs: int = typer.Option(None, "--epochs", min=1, help="Most fine-tuning epochs (env CNNLOOP_EPOCHS; default 8)."),
        device: str = typer.Option(None, "--device", help="Device the challenger trains on: auto, cpu, cuda or cuda:N "
                                   "(env CNNLOOP_DEVICE; default auto)."),
        label_check: str = typer.Option(None, "--label-check", help="What the retrain does with labels the check "
                                        "flags as likely wrong: exclude (default), keep, or downweight (env CNNLOOP_LABEL_CHECK). "
                                        "Flagged labels always go back to the review queue and into the audit log."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        config: Path = opt.CONFIG, registry: str = REGISTRY_OPTION, data_dir: str = DATA_DIR_OPTION,
        s3_endpoint_url: str = S3_ENDPOINT_OPTION, log_url: str = LOG_URL_OPTION,
    ) -> None:
        """Check drift on the production model's traffic, decide by policy, and when it says so: fine-tune
        a challenger from the production weights on the original data + labeled feedback, export it,
        judge champion and challenger on the same holdout, and promote only a better challenger.
        Before training, a label check (cleanlab's confident learning on out-of-sample probabilities)
        flags likely wrong labels: see --label-check.

        Guarded by a lock in the data store (exit 4 when another run holds it). Every pass is appended
        to the audit log DATA_DIR/audit/decisions-YYYY-MM-DD.jsonl. A crash leaves production untouched.
        """
        from training.devices import resolve_device
        from training.retrain.job import retrain_once

        with guarded():
            settings = opt.loop_settings(config, registry, data_dir, s3_endpoint_url, log_url, original_data=original_data, work_dir=work_dir,
                                         epochs=epochs, device=device, label_check=label_check)
            resolve_device(settings.device)  # before the first pass: under --every a pass failing on it would only be logged
            interval = opt.parse_duration(every) if every else None
            if interval is None:
                outcome = retrain_once(settings, console, force=force, show_progress=not quiet)
                _report(outcome, json_out)
                return
        _loop(settings, interval, force, quiet, json_out)


def _report(outcome: dict, json_out: str | None) -> None:
    o = outcome["outcome"]
    console.print(f"[bold]{o['status']}[/]: production = {o.get('production')}", highlight=False)
    if json_out:
        emit_json(outcome, json_out)


def _loop(settings, interval: float, force: bool, quiet: bool, json_out: str | None) -> None:
    from exporters.errors import StorageError
    from training.errors import TrainingError
    from training.retrain.job import retrain_once

    console.print(f"retraining check every {interval:.0f}s; Ctrl-C to stop")
    try:
        while True:
            started = time.time()
            try:
                _report(retrain_once(settings, console, force=force, show_progress=not quiet), json_out)
            except (TrainingError, StorageError) as e:
                # One bad pass (lock held, store down) must not end the schedule.
                err_console.print(f"[bold red]pass failed:[/] {e}", highlight=False, soft_wrap=True)
            force = False  # --force applies to the first pass only
            time.sleep(max(0.0, interval - (time.time() - started)))
    except KeyboardInterrupt:
        console.print("stopped")
