"""`cnnloop demo`."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from training.cli.common import EXIT_CHECK_FAILED, emit_json, guarded

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        work_dir: Path = typer.Option(Path("runs/demo"), "--work-dir", help="Where the demo writes data and runs."),
        json_out: str = typer.Option(None, "--json", help="Write the summary as JSON to this path ('-' for stdout)."),
        min_accuracy: float = typer.Option(0.9, "--min-accuracy", help="Exit 1 if test accuracy ends below this."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        """Run the loop end to end on scikit-learn's real handwritten digits and print a report."""
        from training.demo import run_demo

        with guarded():
            summary = run_demo(work_dir, console, show_progress=not quiet)
        t = Table(title=f"cnnloop demo: digits, fine-tuned in {summary['train_seconds']} s")
        for col in ("split", "n", "accuracy", "macro F1"):
            t.add_column(col)
        for split in ("val", "test"):
            s = summary[split]
            t.add_row(split, str(s["n"]), f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}")
        console.print(t)
        console.print(f"run directory: {summary['run_dir']} (metrics.json, curves.png, confusion_test.png)")
        if json_out:
            emit_json(summary, json_out)
        if summary["test"]["accuracy"] < min_accuracy:
            console.print(f"[red]test accuracy {summary['test']['accuracy']:.4f} is below --min-accuracy {min_accuracy}")
            raise typer.Exit(EXIT_CHECK_FAILED)
