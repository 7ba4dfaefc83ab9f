"""`cnnloop registry list|show|promote|rollback`: needs no torch."""
from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.table import Table

from training.cli.common import emit_json, guarded

app = typer.Typer(help="List, inspect, promote and roll back model versions.", no_args_is_help=True)
console = Console(stderr=True)

RegistryOpt = typer.Option(None, "--registry", help="Registry URI: a local dir or s3://bucket/prefix (default: $CNNLOOP_REGISTRY, else ./registry).")
EndpointOpt = typer.Option(None, "--endpoint-url", help="S3 API endpoint (MinIO, Ceph...); default: $CNNLOOP_S3_ENDPOINT_URL or AWS.")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")


def open_registry(uri: str | None, endpoint_url: str | None):
    from exporters.registry import Registry

    return Registry.open(uri or os.environ.get("CNNLOOP_REGISTRY") or "registry",
                         endpoint_url=endpoint_url or os.environ.get("CNNLOOP_S3_ENDPOINT_URL") or None)


@app.command("list")
def list_command(registry: str = RegistryOpt, endpoint_url: str = EndpointOpt, json_out: bool = JsonOpt) -> None:
    """List every complete version, oldest first, with the aliases pointing at it."""
    with guarded():
        rows = open_registry(registry, endpoint_url).list_versions()
    if json_out:
        return emit_json(rows)
    t = Table(title="model versions")
    for col in ("version", "created_at", "aliases", "backbone", "val accuracy", "parent"):
        t.add_column(col)
    for r in rows:
        acc = f"{r['val_accuracy']:.4f}" if isinstance(r["val_accuracy"], (int, float)) else "-"
        t.add_row(r["version"], r["created_at"] or "-", ", ".join(r["aliases"]) or "-", r["backbone"] or "-", acc, r["parent"] or "-")
    console.print(t)


@app.command("show")
def show_command(version: str = typer.Argument(..., help="A version id, or an alias (production, candidate)."),
                 registry: str = RegistryOpt, endpoint_url: str = EndpointOpt, json_out: bool = JsonOpt) -> None:
    """Show a version's metadata (labels, metrics, files with checksums, variants)."""
    with guarded():
        reg = open_registry(registry, endpoint_url)
        meta = reg.show(reg.resolve_ref(version))
    if json_out:
        return emit_json(meta)
    console.print_json(data={k: v for k, v in meta.items() if k not in ("reference",)}, default=str)


@app.command("promote")
def promote_command(version: str = typer.Argument(..., help="Version id to point the alias at."),
                    alias: str = typer.Option("production", "--alias", help="production or candidate."),
                    registry: str = RegistryOpt, endpoint_url: str = EndpointOpt, json_out: bool = JsonOpt) -> None:
    """Move an alias (default production) to a version; the old target is kept for rollback."""
    with guarded():
        res = open_registry(registry, endpoint_url).promote(version, alias)
    if json_out:
        return emit_json(res)
    console.print(f"{alias}: {res['previous'] or '(none)'} -> {res['version']}" + ("" if res["changed"] else " (unchanged)"))


@app.command("rollback")
def rollback_command(alias: str = typer.Option("production", "--alias", help="production or candidate."),
                     registry: str = RegistryOpt, endpoint_url: str = EndpointOpt, json_out: bool = JsonOpt) -> None:
    """Move an alias back to the version it pointed at before the last promote."""
    with guarded():
        res = open_registry(registry, endpoint_url).rollback(alias)
    if json_out:
        return emit_json(res)
    console.print(f"{alias}: {res['previous']} -> {res['version']} (rolled back)")
