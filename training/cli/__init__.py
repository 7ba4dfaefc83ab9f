"""The `cnnloop` command. Subcommands import their room lazily, so `cnnloop registry` needs no torch."""
from __future__ import annotations

import typer

from training.cli import data_cmd, demo_cmd, export_cmd, registry_cmd, train_cmd
from training.cli import compare_cmd, tune_cmd
from training.cli import drift_cmd, log_cmd, lr_find_cmd, retrain_cmd, serve_cmd

app = typer.Typer(
    name="cnnloop",
    help="Fine-tune an ImageNet-pretrained CNN on your labeled images, export it to ONNX, serve it, "
    "watch drift and retrain. Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 storage unreachable, 4 busy (retrain lock held).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cmd.app, name="data")
train_cmd.register(app)
compare_cmd.register(app)
tune_cmd.register(app)
lr_find_cmd.register(app)
demo_cmd.register(app)
serve_cmd.register(app)
export_cmd.register(app)
drift_cmd.register(app)
retrain_cmd.register(app)

app.add_typer(registry_cmd.app, name="registry")
app.add_typer(log_cmd.app, name="log")


def main() -> None:
    app()
