"""`cnnloop tune`: hyperparameter search over the training recipe (Optuna TPE, pruning, shared studies)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from training.cli.common import EXIT_BAD_INPUT, emit_json, fail, guarded
from training.cli.config_options import with_config_options

console = Console(stderr=True)
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C: the study is kept and resumes


def parse_duration(text: str | None) -> float | None:
    """'2h', '90m', '45s' or plain seconds -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        fail(f"--timeout {text!r} is not a duration: give e.g. 2h, 90m, 45s or seconds", EXIT_BAD_INPUT)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _trials_table(summary: dict, rows: list[dict], limit: int = 15) -> Table:
    t = Table(title=f"study {summary['study']}: {summary['objective']} ({summary['counted_trials']}/{summary['budget']} trials)")
    for col in ("trial", "state", summary["metric"], "fold std", "epochs", "params"):
        t.add_column(col, justify="left" if col in ("state", "params") else "right", overflow="fold")
    # Completed trials best first; a pruned trial's value is its last epoch's, not comparable, so it goes after.
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: -r["value"])
    rest = [r for r in rows if r["state"] != "COMPLETE"]
    for r in (done + rest)[:limit]:
        std = r.get("fold_std")
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        value = "-" if r["value"] is None else f"{r['value']:.4f}" if r["state"] == "COMPLETE" else f"({r['value']:.4f})"
        t.add_row(str(r["number"]), r["state"] + (" (base recipe)" if r.get("enqueued") else ""),
                  value, "-" if std is None else f"{std:.4f}", str(r["epochs_trained"]), params)
    return t


def register(app: typer.Typer) -> None:
    @app.command("tune")
    @with_config_options
    def tune_command(
        data: Path = typer.Argument(..., help="Labeled images: an ImageFolder, a folder with train/ (and val/, test/), or a CSV manifest.",
                                    show_default=False),
        out: Path = typer.Option(..., "--out", help="Folder for best_config.yaml, trials.json, summary.json, PNGs (and study.db by default)."),
        trials: int = typer.Option(20, "--trials", help="Trials in the whole study, shared by every worker on the same --storage/--study."),
        timeout: str = typer.Option(None, "--timeout", help="Stop claiming new trials after this long (2h, 90m, 45s); the running one finishes."),
        folds: int = typer.Option(None, "--folds", help="Score each trial as the mean over K stratified folds (as `cnnloop cv`); default: the val split."),
        storage: str = typer.Option(None, "--storage", help="Study storage: sqlite:///path/study.db or postgresql://user:password@host:5432/db "
                                    "(env CNNLOOP_TUNE_STORAGE; default sqlite:///OUT/study.db).", show_default=False),
        study: str = typer.Option("cnnloop", "--study", help="Study name: the same name and storage resume or join a study."),
        space: Path = typer.Option(None, "--space", help="YAML over the default search space: KEY: {low, high[, log, step]}, {choices: [...]} or a fixed value."),
        pruner: str = typer.Option("median", "--pruner", help="Stop bad trials early: median, hyperband or none."),
        metric: str = typer.Option("accuracy", "--metric", help="What the search maximises: accuracy or macro_f1."),
        worker: int = typer.Option(None, "--worker-index", help="This worker's index (seeds its sampler; env JOB_COMPLETION_INDEX; default 0)."),
        test_dir: Path = typer.Option(None, "--test-dir", help="Held-out ImageFolder, scored ONCE with the best config after the search; never seen by a trial."),
        config: Path = typer.Option(None, "--config", help="YAML recipe the trials start from; keys it sets are fixed, not searched."),
        json_out: str = typer.Option(None, "--json", help="Write the summary as JSON ('-' for stdout)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        overrides: dict = None,
    ) -> None:
        """Search the training recipe with Optuna (TPE sampler, seeded) on validation data only.

        Each trial draws a recipe (lr, backbone_lr_ratio, weight_decay, dropout, label_smoothing,
        strategy, head_epochs, augment, image_size, optimizer, batch_size, backbone among those with
        weights at hand), trains it and scores it on the val split, or on K folds with --folds.
        Trial 0 is the base recipe, so the search reports what it gains over it. Recipe flags and
        --config keys are fixed; --space widens, narrows or fixes the rest.

        Bad trials stop early (--pruner). Ctrl-C stops cleanly: run the same command to resume.
        Many workers (machines, pods) share one study through --storage postgresql://...; --trials
        is the whole study's budget. The linear-probe floor is scored beside the best trial.

        Use the result: cnnloop train DATA --config OUT/best_config.yaml --out RUN
        """
        from training.config import load_train_config
        from training.devices import resolve_device
        from training.tune import report
        from training.tune.run import TuneOptions, tune

        timeout_s = parse_duration(timeout)
        if worker is None:
            worker = int(os.environ.get("JOB_COMPLETION_INDEX", "0") or 0)
        fixed = {k for k, v in overrides.items() if v is not None}
        if storage is None and os.environ.get("CNNLOOP_TUNE_STORAGE", None) == "":
            # In a pod an empty secret would quietly give every worker a study of its own.
            fail("CNNLOOP_TUNE_STORAGE is set but empty: give the shared study's URL, or unset it for sqlite in --out")
        with guarded():
            cfg = load_train_config(config, overrides)
            # Keys set by CNNLOOP_TRAIN_* or --config are the user's choice too: fixed, not searched.
            fixed |= {k for k in cfg.model_fields if f"CNNLOOP_TRAIN_{k.upper()}" in os.environ}
            if config is not None:
                import yaml

                fixed |= set(yaml.safe_load(config.read_text()) or {})
            resolve_device(cfg.device)
            opts = TuneOptions(trials=trials, folds=folds, storage=storage or os.environ.get("CNNLOOP_TUNE_STORAGE"),
                               study=study, space_file=space, pruner=pruner, metric=metric, timeout_s=timeout_s,
                               worker=worker, test_dir=test_dir)
            try:
                summary = tune(data, out, cfg, opts, fixed, console=console, show_progress=not quiet)
            except KeyboardInterrupt:
                fail("interrupted; the study is kept: run the same command to resume it", EXIT_INTERRUPTED)
        rows = json.loads((out / report.TRIALS).read_text())
        console.print(_trials_table(summary, rows))
        _print_verdict(summary, out)
        if json_out:
            emit_json(summary, json_out)
        if summary["stopped_by"] == "interrupt":
            raise typer.Exit(EXIT_INTERRUPTED)
        if summary["best"] is None:
            fail("no trial completed; see the errors in trials.json", 1)


def _print_verdict(s: dict, out: Path) -> None:
    states = ", ".join(f"{n} {k.lower()}" for k, n in sorted(s["states"].items()))
    console.print(f"{s['counted_trials']} trials counted ({states}); {s['epochs_trained']} epochs trained; stopped by {s['stopped_by']}",
                  highlight=False)
    if not s["best"]:
        return
    best, base, floor = s["best"], s["base_recipe"], s["linear_probe"]
    line = f"best: trial {best['number']} {s['metric']} {best['value']:.4f}"
    if best.get("fold_std") is not None:
        line += f" +- {best['fold_std']:.4f}"
    if base:
        line += f"; base recipe {base['value']:.4f} ({best['value'] - base['value']:+.4f})"
    console.print(line, highlight=False)
    if floor is None:
        return
    gap = best["value"] - floor["value"]
    console.print(f"linear probe {floor['value']:.4f}: the best recipe " + (f"beats it by {gap:+.4f}." if s["beats_linear_probe"]
                  else f"does NOT beat it ({gap:+.4f}): a frozen-feature probe does as well."), highlight=False)
    if s.get("test"):
        console.print(f"test dir, scored once after the search: accuracy {s['test']['accuracy']:.4f} "
                      f"macro-F1 {s['test']['macro_f1']:.4f} (n={s['test']['n']}; run in {s['test']['run_dir']})", highlight=False)
    console.print(f"best config: {out / 'best_config.yaml'}  ->  cnnloop train DATA --config {out / 'best_config.yaml'} --out RUN",
                  highlight=False)
