"""`cnnloop data ...`: datasets that exist on every machine."""
from __future__ import annotations

from pathlib import Path

import typer

from training.cli.common import emit_json, guarded

app = typer.Typer(help="Write embedded datasets to disk.", no_args_is_help=True)


@app.command("digits")
def digits(
    out: Path = typer.Option(..., "--out", help="Folder to create: OUT/<digit>/<n>.png"),
    size: int = typer.Option(32, help="Side of the written PNGs (upscaled from 8x8)."),
    limit_per_class: int = typer.Option(None, help="Write at most this many images per digit."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the class counts as JSON."),
) -> None:
    """Write scikit-learn's real handwritten digits (1,797 images, 10 classes) as an ImageFolder."""
    from training.data.digits import write_digits

    with guarded():
        counts = write_digits(out, size, limit_per_class, overwrite)
    if json_out:
        emit_json({"out": str(out), "counts": counts})
    else:
        typer.echo(f"wrote {sum(counts.values())} images in {len(counts)} classes to {out}")
