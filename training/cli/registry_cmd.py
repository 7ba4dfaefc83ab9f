"""`cnnloop registry list|show|promote|rollback`: reads and moves registry aliases; needs no torch."""
from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from training.cli.common import REGISTRY_OPTION, S3_ENDPOINT_OPTION, emit_json, guarded, store_locations

app = typer.Typer(help="List, inspect, promote and roll back model versions in a registry.", no_args_is_help=True)
console = Console()

# Metadata too large to be worth reading in a terminal; `show --json` still prints it.
_BULKY_FIELDS = ("reference", "files", "variants", "training", "input", "outputs", "onnx", "preprocess")

JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout for scripts instead of a table.")
AliasOpt = typer.Option("production", "--alias", help="Alias to move: production or candidate.")


def open_registry(locations):
    """The registry `locations` (common.store_locations: flags over CNNLOOP_* env, default ./registry) name."""
    from exporters.model_store.registry import Registry  # boto3 and the registry load only when a command runs

    return Registry.open(locations.registry, endpoint_url=locations.s3_endpoint_url)


def _metric(metrics: Any, split: str) -> str:
    value = ((metrics or {}).get(split) or {}).get("accuracy") if isinstance(metrics, dict) else None
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


@app.command("list")
def list_command(registry: str = REGISTRY_OPTION, s3_endpoint_url: str = S3_ENDPOINT_OPTION, json_out: bool = JsonOpt) -> None:
    """List every complete version, oldest first, with the aliases that point at it.

    Uploads that never finished (no bundle.json) are not listed."""
    with guarded():
        locations = store_locations(registry, s3_endpoint_url)
        rows = open_registry(locations).list_versions()
    if json_out:
        return emit_json(rows)
    where = locations.registry
    if not rows:
        console.print(f"no versions in {where} yet; publish one with `cnnloop export RUN_DIR --registry {where}`")
        return
    t = Table(title=f"model versions in {where}")
    # Ids never wrap or get cut: people copy them into `promote`. An id already says when the
    # version was made (UTC), so no separate date column is needed to fit 80 columns.
    t.add_column("version", no_wrap=True, min_width=23)
    for col in ("aliases", "backbone", "val acc", "test acc"):
        t.add_column(col, overflow="fold")
    for r in rows:
        if "error" in r:
            t.add_row(r["version"], "-", f"[red]{escape(r['error'])}[/]", "-", "-")
            continue
        t.add_row(r["version"], ", ".join(r["aliases"]) or "-", escape(str(r["backbone"] or "-")),
                  _metric(r["metrics"], "val"), _metric(r["metrics"], "test"))
    console.print(t)


@app.command("show")
def show_command(version: str = typer.Argument(..., help="A version id, or an alias (production, candidate)."),
                 registry: str = REGISTRY_OPTION, s3_endpoint_url: str = S3_ENDPOINT_OPTION, json_out: bool = JsonOpt) -> None:
    """Show one version: its metadata and every file with size and sha256.

    --json prints the whole bundle.json, including the drift reference statistics."""
    with guarded():
        reg = open_registry(store_locations(registry, s3_endpoint_url))
        meta = reg.show(reg.resolve_ref(version))
    if json_out:
        return emit_json(meta)
    t = Table(title=f"version {meta['version']}", show_header=False)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    for key, value in meta.items():
        if key not in _BULKY_FIELDS:
            t.add_row(key, escape(value if isinstance(value, str) else json.dumps(value, default=str)))
    console.print(t)
    # Files as plain unwrapped lines, not a table: a sha256 is only useful whole and uncut.
    console.print("files:", style="bold")
    for name, entry in meta.get("files", {}).items():
        console.print(f"  {name}  {entry['size']:,} bytes  sha256 {entry['sha256']}", soft_wrap=True, highlight=False)


@app.command("promote")
def promote_command(version: str = typer.Argument(..., help="Version id to point the alias at."),
                    alias: str = AliasOpt, registry: str = REGISTRY_OPTION, s3_endpoint_url: str = S3_ENDPOINT_OPTION,
                    json_out: bool = JsonOpt) -> None:
    """Point an alias (default production) at a complete version.

    The version it pointed at before is kept in the alias history, so `rollback` can undo this.
    Services following the alias pick the new version up at their next poll."""
    with guarded():
        res = open_registry(store_locations(registry, s3_endpoint_url)).promote(version, alias)
    if json_out:
        return emit_json(res)
    console.print(f"{alias}: {res['previous'] or '(none)'} -> {res['version']}" + ("" if res["changed"] else " (unchanged)"))


@app.command("rollback")
def rollback_command(alias: str = AliasOpt, registry: str = REGISTRY_OPTION, s3_endpoint_url: str = S3_ENDPOINT_OPTION,
                     json_out: bool = JsonOpt) -> None:
    """Point an alias back at the version it pointed at before its last promote.

    Repeat it to walk further back; it fails when the alias has no earlier version."""
    with guarded():
        res = open_registry(store_locations(registry, s3_endpoint_url)).rollback(alias)
    if json_out:
        return emit_json(res)
    console.print(f"{alias}: {res['previous']} -> {res['version']} (rolled back)")
