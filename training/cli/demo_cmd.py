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
        work_dir: Path = typer.Option(Path("runs/demo"), "--work-dir", help="Where the demo writes data, runs, registry and logs."),
        json_out: str = typer.Option(None, "--json", help="Write the summary as JSON to this path ('-' for stdout)."),
        min_accuracy: float = typer.Option(0.9, "--min-accuracy", help="Exit 1 if the first model's test accuracy is below this."),
        label_budget: float = typer.Option(0.25, "--label-budget", min=0.01, max=1.0,
                                           help="Share of each traffic stream a (simulated) reviewer labels through the "
                                           "review queue, e.g. 0.1 for 10%; 1.0 labels every image."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        """Run the whole loop on scikit-learn's real handwritten digits, in a few minutes on a CPU.

        Fine-tune, export, serve with `bentoml serve`, send predictions, label a budget of them through
        the review queue (a simulated reviewer who gives the true label), shift the traffic (inverted
        digits), label again, show the drift report, retrain, promote, swap, and measure the shifted
        accuracy before and after. Exit 1 if the loop did not close: no drift seen, no promotion, or
        no recovery on the shifted traffic.
        """
        from training.demo.loop import run_demo

        with guarded():
            s = run_demo(work_dir, console, show_progress=not quiet, label_budget=label_budget)
        t = Table(title="cnnloop demo: the loop on handwritten digits")
        for col in ("", "before", "after"):
            t.add_column(col)
        t.add_row("production model", s["versions"]["before"], s["versions"]["after"])
        t.add_row(f"accuracy on shifted traffic (n={s['shifted_accuracy']['n']})",
                  f"{s['shifted_accuracy']['before']:.3f}", f"{s['shifted_accuracy']['after']:.3f}")
        t.add_row(f"accuracy on clean traffic (n={s['clean_accuracy']['n']})",
                  f"{s['clean_accuracy']['before']:.3f}", f"{s['clean_accuracy']['after']:.3f}")
        lab = s["labels"]["shifted"]
        t.add_row("shifted images labeled (review queue)", "0", f"{lab['labeled']} of {lab['of']} ({lab['labeled'] / lab['of']:.0%})")
        console.print(t)
        clean = s["labels"]["clean"]
        console.print(f"labels spent through the review queue: {clean['labeled']} of {clean['of']} clean and "
                      f"{lab['labeled']} of {lab['of']} shifted images (--label-budget {s['labels']['budget']}); "
                      f"the model had {lab['model_was_right']} of the shifted ones right", highlight=False, soft_wrap=True)
        console.print(f"first model: test accuracy {s['train']['test']['accuracy']:.4f}; drift detected: {s['drift_detected']} "
                      f"(combined p {s['drift']['combined_p_value']}); retrain: {s['retrain']['status']}; "
                      f"timings (s): {s['timings_s']}", highlight=False, soft_wrap=True)
        console.print(f"drift picture: {s['paths']['drift_png']}; audit log: {s['paths']['audit_log']}", highlight=False)
        if json_out:
            emit_json(s, json_out)
        problems = []
        if s["train"]["test"]["accuracy"] < min_accuracy:
            problems.append(f"test accuracy {s['train']['test']['accuracy']:.4f} is below --min-accuracy {min_accuracy}")
        if not s["drift_detected"]:
            problems.append("the drift report did not detect the shift")
        if not s["promoted"]:
            problems.append("the retrained model was not promoted")
        elif s["shifted_accuracy"]["after"] <= s["shifted_accuracy"]["before"]:
            problems.append("accuracy on the shifted traffic did not recover")
        for p in problems:
            console.print(f"[red]loop did not close:[/] {p}")
        if problems:
            raise typer.Exit(EXIT_CHECK_FAILED)
