"""`cnnloop compare`: the same recipe and the same folds for several backbones, accuracy vs serving speed."""
from __future__ import annotations

import io
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from training.cli.common import emit_json, guarded
from training.cli.config_options import with_config_options

console = Console(stderr=True)


def _parse_weights_for(values: list[str] | None) -> dict[str, str]:
    from training.errors import TrainingError

    pairs = {}
    for v in values or []:
        name, sep, weights = v.partition("=")
        if not sep or not name.strip() or not weights.strip():
            raise TrainingError(f"--backbone-weights takes NAME=WEIGHTS (e.g. resnet18=weights/resnet18.pth), got '{v}'")
        pairs[name.strip()] = weights.strip()
    return pairs


COLUMNS = ("backbone", "px", "accuracy", "macro-F1", "probe acc", "beats probe", "img/s b1", "p50 ms b1",
           "img/s b32", "p50 ms b32", "ONNX MB", "train s", "Pareto")


def _cells(r: dict) -> list[str]:
    b1, b32 = r["onnxruntime"]["batch_1"], r["onnxruntime"]["batch_32"]
    return [r["backbone"], str(r["image_size"]), f"{r['accuracy']['mean']:.4f} ± {r['accuracy']['std']:.4f}",
            f"{r['macro_f1']['mean']:.4f} ± {r['macro_f1']['std']:.4f}", f"{r['linear_probe']['accuracy']['mean']:.4f}",
            "yes" if r["beats_linear_probe"] else "[bold red]NO[/]",
            f"{b1['images_per_s']:.1f}", f"{b1['p50_ms']:.1f}", f"{b32['images_per_s']:.1f}", f"{b32['p50_ms']:.1f}",
            f"{r['export']['onnx_fp32_bytes'] / 1e6:.1f}", f"{r['train_seconds']['folds_total']:.0f}", "*" if r["pareto"] else ""]


def comparison_tables(result: dict) -> tuple[Table, Table]:
    """(one row per backbone, one column per backbone): the second fits an 80-column terminal."""
    title = (f"{len(result['backbones'])} backbones, {result['k']}-fold CV on {result['data']}, "
             f"ONNX Runtime CPU ({result['timing']['intra_op_threads']} threads)")
    rows = [_cells(r) for r in result["backbones"]]
    wide = Table(title=title)
    for col in COLUMNS:
        wide.add_column(col, justify="left" if col == "backbone" else "right", no_wrap=True)
    for cells in rows:
        wide.add_row(*cells)
    tall = Table(title=title)
    tall.add_column("", no_wrap=True)
    for cells in rows:
        tall.add_column(cells[0], justify="right", no_wrap=True)
    for i, col in enumerate(COLUMNS[1:], start=1):
        tall.add_row(col, *(cells[i] for cells in rows))
    return wide, tall


def print_comparison(result: dict) -> None:
    wide, tall = comparison_tables(result)
    needed = Console(file=io.StringIO(), width=1000).measure(wide).maximum
    if not console.is_terminal:  # a file or CI log: wide, never squeezed into 80 columns
        Console(stderr=True, width=max(console.width, needed), color_system=None).print(wide)
    else:
        console.print(wide if needed <= console.width else tall)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    @with_config_options
    def compare_command(
        data: Path = typer.Argument(..., help="One labeled ImageFolder (or CSV manifest), cross-validated for every backbone.",
                                    show_default=False),
        backbones: str = typer.Option(..., "--backbones", show_default=False,
                                      help="Comma-separated backbone names, at least 2 (e.g. efficientnet_lite0,efficientnet_lite2)."),
        out: Path = typer.Option(..., "--out", help="Folder for compare.json, compare.png and onnx/<backbone>.onnx."),
        folds: int = typer.Option(5, "--folds", help="Number of stratified folds, the same for every backbone."),
        backbone_weights: list[str] = typer.Option(None, "--backbone-weights", show_default=False,
                                                   help="NAME=WEIGHTS for one backbone (a path, s3:// URI or 'none'); "
                                                        "repeat per backbone. Others take --weights."),
        bench_seconds: float = typer.Option(2.0, "--bench-seconds", min=0.05,
                                            help="ONNX Runtime time per backbone and batch size, split over the rounds."),
        rounds: int = typer.Option(4, "--rounds", min=1, help="Round-robin timing rounds over all backbones."),
        config: Path = typer.Option(None, "--config", help="YAML file of recipe settings (the base recipe of every backbone)."),
        json_out: str = typer.Option(None, "--json", help="Also write the comparison JSON to this path ('-' for stdout)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        overrides: dict = None,
    ) -> None:
        """Compare backbones under one recipe: CV accuracy, linear-probe floor, ONNX size and speed.

        Every backbone gets the same base recipe (only the backbone and its weights change; the crop
        size is each backbone's default unless --image-size fixes it) and the same stratified folds
        (checked: the held-out files of each fold are hashed and must match). Per backbone: accuracy
        and macro-F1 mean ± std over the folds, the linear probe on the same folds (a backbone that
        does not beat it is flagged), the training time, the last fold's model exported to ONNX
        (size, parity with torch) and ONNX Runtime CPU images/s and p50 latency at batch 1 and 32,
        all graphs timed in this one process in interleaved rounds, with as many threads as the
        service would use.

        compare.png plots accuracy (error bar: std over folds) against batch-32 images/s on a log
        axis. Up and to the right is better; the dashed line joins the Pareto front, the backbones no
        other beats on both accuracy and speed. Pick from the front: its leftmost point is the most
        accurate, each step right trades accuracy for throughput. A point off the front is never the
        right pick for this data; overlapping error bars mean the folds cannot tell two apart.
        """
        from training.compare import compare_backbones, plot_pareto, resolve_contenders
        from training.config import load_train_config
        from training.devices import resolve_device
        from training.errors import TrainingError

        with guarded():
            if overrides.get("backbone") is not None:
                raise TrainingError("compare takes --backbones a,b[,c...], not --backbone")
            if folds < 2:
                raise TrainingError(f"--folds must be at least 2, got {folds}")
            cfg = load_train_config(config, overrides)
            resolve_device(cfg.device)
            names = [n.strip() for n in backbones.split(",") if n.strip()]
            contenders = resolve_contenders(names, cfg, _parse_weights_for(backbone_weights))
            out.mkdir(parents=True, exist_ok=True)
            result = compare_backbones(data, contenders, folds, out, bench_seconds, rounds, console=console,
                                       show_progress=not quiet)
            plot_pareto(result, out / "compare.png")
        emit_json(result, str(out / "compare.json"))
        print_comparison(result)
        behind = [r["backbone"] for r in result["backbones"] if not r["beats_linear_probe"]]
        if behind:
            console.print(f"[bold red]not above the linear probe:[/] {', '.join(behind)}: a frozen-feature logistic "
                          "regression does as well as fine-tuning them with this recipe.")
        console.print(f"Pareto front (accuracy vs batch-32 images/s): {', '.join(result['pareto_front'])}. "
                      f"Wrote {out / 'compare.json'} and {out / 'compare.png'}.")
        if json_out:
            emit_json(result, json_out)
