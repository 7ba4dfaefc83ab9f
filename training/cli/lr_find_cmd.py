"""`cnnloop lr-find`."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from training.cli.common import emit_json, guarded
from training.cli.config_options import with_config_options
from training.cli.train_cmd import DATA_HELP

console = Console(stderr=True)


def _suggestions_table(result: dict) -> Table:
    end = "diverged" if result["diverged"] else "ran to the end"
    t = Table(title=f"lr range test: {len(result['points'])}/{result['steps']} steps ({end}), "
                    f"{result['open_stages']}/{result['n_stages']} backbone stages open")
    for col in ("suggestion", "head lr", "backbone lr", "how"):
        t.add_column(col, justify="right" if "lr" in col else "left")
    for name, s in result["suggestions"].items():
        star = " *" if name == result["recommended"] else ""
        backbone = f"{s['backbone_lr']:.2e}" if s["backbone_lr"] is not None else "-"
        t.add_row(name + star, f"{s['head_lr']:.2e}", backbone, s["how"])
    return t


def register(app: typer.Typer) -> None:
    @app.command("lr-find")
    @with_config_options
    def lr_find_command(
        data: Path = typer.Argument(..., help=DATA_HELP, show_default=False),
        out: Path = typer.Option(Path("lr-find"), "--out", help="Folder for lr_find.png and lr_find.json."),
        config: Path = typer.Option(None, "--config", help="YAML file of recipe settings (keys as the flags, with _)."),
        apply: Path = typer.Option(None, "--apply", help="Write the recommended lr into this YAML recipe (created if absent, other keys kept)."),
        start_lr: float = typer.Option(1e-7, "--start-lr", help="Head learning rate of the first step."),
        end_lr: float = typer.Option(10.0, "--end-lr", help="Head learning rate of the last step."),
        steps: int = typer.Option(100, "--steps", help="Optimiser steps of the sweep (the train split is cycled if shorter; at least 10)."),
        beta: float = typer.Option(0.98, "--beta", help="Smoothing of the loss curve (exponential moving average, bias-corrected)."),
        diverge: float = typer.Option(4.0, "--diverge", help="Stop once the smoothed loss exceeds this many times its best."),
        json_out: str = typer.Option(None, "--json", help="Also write the result JSON to this path ('-' for stdout)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        overrides: dict = None,
    ) -> None:
        """Learning-rate range test: find the --lr to train with before you train.

        Builds the model and train split `cnnloop train` would build with the same recipe flags, opens
        the backbone stages the schedule trains (gradual: those open right after --head-epochs), then
        takes --steps optimiser steps while the head lr grows exponentially from --start-lr to --end-lr
        (backbone lr = head lr x --backbone-lr-ratio throughout). The loss first stalls, then falls,
        then blows up; the sweep stops when it does. All weights, BatchNorm statistics included, and
        the random state are put back afterwards: nothing is trained.

        Suggestions: valley (recommended: 2/3 down the longest descent of the smoothed loss), steepest
        (steepest descent) and minimum/10. Train with the recommended value as --lr, or pass --apply
        recipe.yaml and then `cnnloop train DATA --config recipe.yaml`. Look at lr_find.png: a curve
        without a clear descent means the suggestion is a guess (more --steps, a larger --batch-size).
        """
        from training.config import load_train_config
        from training.devices import resolve_device
        from training.lr_find import apply_lr, check_sweep, find_lr, read_recipe
        from training.scoring.plots import plot_lr_find

        with guarded():
            check_sweep(start_lr, end_lr, steps)  # before any image is decoded
            if apply is not None:
                read_recipe(apply)
            cfg = load_train_config(config, overrides)
            resolve_device(cfg.device)
            result = find_lr(data, cfg, start_lr, end_lr, steps, beta, diverge, console, show_progress=not quiet)
            if apply is not None:
                old, new = apply_lr(apply, result["lr"])
                result["applied"] = {"config": str(apply), "old_lr": old, "new_lr": new}
        out.mkdir(parents=True, exist_ok=True)
        plot_lr_find(result, out / "lr_find.png")
        (out / "lr_find.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        console.print(_suggestions_table(result))
        console.print(f"recommended: --lr {result['lr']:g}; picture {out / 'lr_find.png'}, points {out / 'lr_find.json'}",
                      highlight=False, soft_wrap=True)
        if apply is not None:
            was = "unset (recipe default)" if old is None else old
            console.print(f"{apply}: lr {was} -> {new:g}", highlight=False, soft_wrap=True)
        if json_out:
            emit_json(result, json_out)
