"""`cnnloop drift`: is the production model's recent traffic still like its validation data?"""
from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from training.cli import loop_options as opt
from training.cli.common import (DATA_DIR_OPTION, LOG_URL_OPTION, EXIT_CHECK_FAILED, REGISTRY_OPTION, S3_ENDPOINT_OPTION, emit_json, fail,
                                 guarded)

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("drift")
    def drift_command(
        since: str = typer.Option(None, "--since", help="Window start: a duration ago (30m, 2h, 1d) or an ISO time (UTC)."),
        last: int = typer.Option(None, "--last", min=1, help="Window = the newest N predictions (default: setting `window`, 500)."),
        json_out: str = typer.Option(None, "--json", help="Write the full report as JSON to this path ('-': stdout)."),
        png: Path = typer.Option(None, "--png", help="Write a PNG of the report (classes, confidence, embeddings, tests)."),
        fail_on_drift: bool = typer.Option(False, "--fail-on-drift", help="Exit 1 when drift is detected (for alerting scripts)."),
        config: Path = opt.CONFIG, registry: str = REGISTRY_OPTION, data_dir: str = DATA_DIR_OPTION,
        s3_endpoint_url: str = S3_ENDPOINT_OPTION, log_url: str = LOG_URL_OPTION,
    ) -> None:
        """Compare logged predictions of the production model with its bundle's reference statistics.

        Tests: KS per class on softmax outputs (Bonferroni), chi-square + PSI on predicted classes,
        MMD on PCA-projected embeddings (permutation p), confidence and entropy shift; plus accuracy on
        labeled feedback (95% CI) and accuracy estimated without labels. The verdict combines the first
        three with Bonferroni at alpha. Below `min_samples` predictions it says "insufficient data".
        Exit 0 whatever the verdict, unless --fail-on-drift.
        """
        if since and last:
            fail("give --since or --last, not both")
        from exporters.model_store.registry import Registry
        from training.drift.render import plot_report, print_report
        from training.retrain.job import drift_check, open_log

        with guarded():
            settings = opt.loop_settings(config, registry, data_dir, s3_endpoint_url, log_url)
            start = opt.parse_since(since, time.time()) if since else None
            reg = Registry.open(settings.registry, endpoint_url=settings.s3_endpoint_url)
            log = open_log(settings)
            try:
                check = drift_check(settings, reg, log, since=start, last=last)
            finally:
                log.close()
        report = check.report
        print_report(report, console)
        if png:
            plot_report(report, check.reference, check.window, png)
            console.print(f"wrote {png}")
        if json_out:
            emit_json(report, json_out)
        if fail_on_drift and report["drift_detected"]:
            raise typer.Exit(EXIT_CHECK_FAILED)
