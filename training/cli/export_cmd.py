"""`cnnloop export RUN_DIR --registry URI`: a training run -> a verified bundle -> a new registry version.

stdout gets the version id alone (scripts capture it); everything for humans goes to stderr.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from training.cli.common import EXIT_BAD_INPUT, REGISTRY_OPTION, S3_ENDPOINT_OPTION, emit_json, fail, guarded, store_locations

console = Console(stderr=True)
PROMOTE_ALIASES = ("candidate", "production")


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        run_dir: Path = typer.Argument(..., help="A finished training run (the --out of `cnnloop train`).", show_default=False),
        registry_uri: str = REGISTRY_OPTION,
        s3_endpoint_url: str = S3_ENDPOINT_OPTION,
        variants: str = typer.Option("fp16,int8", "--variants", help="Extra variants to build: fp16, int8 (comma-separated), or none."),
        max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop",
                                                help="Refuse a variant losing more validation accuracy than this (points)."),
        parent: str = typer.Option(None, "--parent", help="Parent version id (default: the registry's production version)."),
        promote: str = typer.Option(None, "--promote", help="Point this alias at the new version: candidate or production."),
        json_out: str = typer.Option(None, "--json", help="Write {version, metadata} as JSON to this path ('-': stdout, instead of the bare id)."),
    ) -> None:
        """Export a run to ONNX (fp32 + fp16/int8 variants), verify it, and publish it as a new registry version.

        The export fails (exit 2) if ONNX Runtime and torch disagree on the validation images;
        a variant losing more than --max-accuracy-drop points is left out and recorded as refused.
        Prints the new version id on stdout.
        """
        if not run_dir.is_dir():
            fail(f"run directory {run_dir} does not exist; pass the --out folder of a finished `cnnloop train`", EXIT_BAD_INPUT)
        if promote is not None and promote not in PROMOTE_ALIASES:
            fail(f"--promote must be one of {', '.join(PROMOTE_ALIASES)}, not '{promote}'", EXIT_BAD_INPUT)

        from exporters.model_store.registry import Registry
        from exporters.export.variants import parse_variants
        from training.run.publish import publish_run

        with guarded():
            locations = store_locations(registry_uri, s3_endpoint_url)
            wanted = parse_variants(variants)
            # Registry first: an unreachable store fails in a second (exit 3), not after a minute of
            # exporting. Reading the production alias is that check, and gives the default parent:
            # a new export descends from what is serving (None for a registry's first version).
            registry = Registry.open(locations.registry, endpoint_url=locations.s3_endpoint_url)
            production = registry.resolve("production")
            if parent:
                registry.show(parent)  # an unknown --parent is refused now, not recorded as a dangling link
            version, metadata = publish_run(run_dir, registry, wanted, max_accuracy_drop, parent or production,
                                            log=lambda msg: console.print(msg, highlight=False, soft_wrap=True))
            if promote:
                registry.promote(version, promote)
        kept = [n for n, v in metadata["variants"].items() if not v["refused"]]
        console.print(f"published version {version} to {locations.registry} (variants: {', '.join(kept)}"
                      + (f"; refused: {', '.join(metadata['refused_variants'])}" if metadata["refused_variants"] else "")
                      + (f"; alias {promote} -> {version}" if promote else "") + ")", highlight=False, soft_wrap=True)
        if json_out:
            emit_json({"version": version, "metadata": metadata}, json_out)
        if json_out != "-":
            typer.echo(version)
