"""`cnnloop train`, `cnnloop cv`, `cnnloop evaluate`."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from training.cli.common import emit_json, guarded
from training.cli.config_options import with_config_options

console = Console(stderr=True)

DATA_HELP = "An ImageFolder (DATA/<class>/<images>), a folder holding train/ and optional val/, test/ ImageFolders, or a CSV manifest (columns path,label and optional split)."


def _scores_table(title: str, rows: dict[str, dict]) -> Table:
    t = Table(title=title)
    for col in ("split", "n", "accuracy", "macro F1", "macro precision", "macro recall"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for name, s in rows.items():
        t.add_row(name, str(s["n"]), f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}", f"{s['macro_precision']:.4f}", f"{s['macro_recall']:.4f}")
    return t


def _print_confidence(metrics: dict, where: str = "test split") -> None:
    from exporters.calibration import Calibration
    from training.scoring.confidence import confidence_lines

    calibration = Calibration.from_json(metrics.get("calibration"))
    if calibration is not None:
        for line in confidence_lines(calibration, metrics, where):
            console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("train")
    @with_config_options
    def train_command(
        data: Path = typer.Argument(..., help=DATA_HELP, show_default=False),
        out: Path = typer.Option(..., "--out", help="Run directory to write (weights, metrics.json, plots)."),
        test_dir: Path = typer.Option(None, "--test-dir", help="Held-out test ImageFolder, never used for training or early stopping."),
        config: Path = typer.Option(None, "--config", help="YAML file of recipe settings (keys as the flags, with _)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --out."),
        json_out: str = typer.Option(None, "--json", help="Write metrics JSON to this path ('-' for stdout)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        overrides: dict = None,
    ) -> None:
        """Fine-tune an ImageNet-pretrained CNN on labeled images and write a run directory.

        Missing val/test splits are carved from train (stratified, seeded). The run directory gets
        model.safetensors, model.json, config.yaml, classes.json, metrics.json (per-epoch history,
        final val/test scores, calibration before/after, prediction-set coverage, accuracy at 80/90/100%
        coverage), calibration.json (temperature, conformal threshold and abstention rule fitted on val,
        carried into the bundle by export), curves.png, confusion_*.png, reliability.png and
        risk_coverage.png.

        Data-parallel on several CPUs or GPUs: torchrun --standalone --nproc_per_node=N --no-python cnnloop train ...
        """
        from training.config import load_train_config
        from training.devices import resolve_device
        from training.loop.distributed import read_launch_env
        from training.train import train

        with guarded():
            cfg = load_train_config(config, overrides)
            resolve_device(cfg.device)  # a device this machine lacks fails before any image is decoded
            launch = read_launch_env()
            metrics = train(data, out, cfg, test_dir=test_dir, overwrite=overwrite, console=console, show_progress=not quiet)
        if not launch.is_main:
            return  # under torchrun, rank 0 reports for the whole job
        console.print(_scores_table(f"run {out} (best epoch {metrics['best_epoch']})",
                                    {k: metrics[k] for k in ("val", "test") if k in metrics}))
        _print_confidence(metrics)
        if json_out:
            keys = ("val", "test", "best_epoch", "history", "calibration", "calibration_test", "prediction_sets", "risk_coverage")
            emit_json({k: metrics[k] for k in keys if k in metrics}, json_out)

    @app.command("cv")
    @with_config_options
    def cv_command(
        data: Path = typer.Argument(..., help="One labeled ImageFolder (or CSV manifest) to cross-validate on.", show_default=False),
        folds: int = typer.Option(5, "--folds", help="Number of stratified folds."),
        config: Path = typer.Option(None, "--config", help="YAML file of recipe settings."),
        json_out: str = typer.Option(None, "--json", help="Write per-fold scores and the summary as JSON ('-' for stdout)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        overrides: dict = None,
    ) -> None:
        """k-fold cross-validation: accuracy and macro-F1 as mean +- std over folds."""
        from training.config import load_train_config
        from training.cv import cross_validate
        from training.devices import resolve_device

        with guarded():
            cfg = load_train_config(config, overrides)
            resolve_device(cfg.device)
            result = cross_validate(data, cfg, folds, console=console, show_progress=not quiet)
        t = Table(title=f"{folds}-fold cross-validation on {data}")
        t.add_column("metric")
        t.add_column("recipe mean", justify="right")
        t.add_column("std", justify="right")
        t.add_column("linear probe mean", justify="right")
        t.add_column("std", justify="right")
        floor = result["linear_probe"]["summary"]
        for k, v in result["summary"].items():
            t.add_row(k, f"{v['mean']:.4f}", f"{v['std']:.4f}", f"{floor[k]['mean']:.4f}", f"{floor[k]['std']:.4f}")
        console.print(t)
        gap = result["summary"]["accuracy"]["mean"] - floor["accuracy"]["mean"]
        console.print(f"linear probe: {result['linear_probe']['what']}. The recipe "
                      + (f"beats it by {gap:+.4f} accuracy." if result["beats_linear_probe"]
                         else f"does NOT beat it ({gap:+.4f} accuracy): a frozen-feature probe does as well."))
        if json_out:
            emit_json(result, json_out)

    @app.command("evaluate")
    def evaluate_command(
        run_dir: Path = typer.Argument(..., help="A finished training run directory.", show_default=False),
        data: Path = typer.Argument(..., help="Labeled ImageFolder to score (its classes must be known to the run).", show_default=False),
        out: Path = typer.Option(None, "--out", help="Folder for the confusion matrix PNG and scores JSON."),
        json_out: str = typer.Option(None, "--json", help="Write the scores as JSON ('-' for stdout)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    ) -> None:
        """Re-score a trained run on any labeled folder (accuracy, macro P/R/F1, per-class, confusion).

        With the run's calibration (calibration.json): calibration before/after, prediction-set coverage
        and size, and accuracy at 80/90/100% coverage; --out gets reliability.png and risk_coverage.png."""
        from training.devices import resolve_device
        from training.evaluate import evaluate_run

        with guarded():
            resolve_device(device)
            scores = evaluate_run(run_dir, data, out, device)
        console.print(_scores_table(f"{run_dir} on {data}", {"data": scores}))
        _print_confidence(scores, str(data))
        if json_out:
            emit_json(scores, json_out)
