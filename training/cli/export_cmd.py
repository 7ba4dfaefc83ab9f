"""`cnnloop export RUN_DIR --registry URI`: a training run -> a verified bundle -> a new registry version.

stdout gets the version id alone (scripts capture it); everything for humans goes to stderr.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer
from rich.console import Console

from training.cli.common import EXIT_BAD_INPUT, emit_json, fail, guarded

if TYPE_CHECKING:
    from exporters.bundle import LabeledImages, RunDescription
    from exporters.preprocess import ResizePolicy
    from training.run_dir import LoadedRun

console = Console(stderr=True)
PROMOTE_ALIASES = ("candidate", "production")


def split_labels(splits: dict, classes: list[str]) -> dict[str, int]:
    """path -> class index. splits.json lists paths only, so labels come from re-discovering the
    run's data origin (ImageFolder or manifest); an image's parent folder name is the fallback."""
    from training.datasets import discover

    labels: dict[str, int] = {}
    origin = splits.get("origin") or {}
    data = origin.get("data")
    if data and Path(data).exists():
        try:
            source = discover(Path(data), Path(origin["test_dir"]) if origin.get("test_dir") else None)
            for part in (source.train, source.val, source.test):
                if part is not None:
                    labels.update({str(p): classes.index(part.classes[int(y)]) for p, y in zip(part.paths, part.labels)})
        except Exception:  # a changed origin is not fatal: the folder-name fallback may still label everything
            pass
    return labels


def _label_of(path: str, split: str, classes: list[str], labels: dict[str, int], origin: dict) -> int:
    if path in labels:
        return labels[path]
    if Path(path).parent.name in classes:
        return classes.index(Path(path).parent.name)
    from exporters.errors import ExportError

    raise ExportError(f"cannot tell the label of {split} image {path}: it is in no class folder and the run's data "
                      f"origin {origin} no longer lists it; restore the data the run was trained on")


def split_class_counts(splits: dict, name: str, classes: list[str], labels: dict[str, int]) -> list[int]:
    """Images per class in a split, from the file list alone (nothing decoded)."""
    ys = [_label_of(p, name, classes, labels, splits.get("origin")) for p in splits.get(name) or []]
    return np.bincount(np.asarray(ys, dtype=np.int64), minlength=len(classes)).tolist()


def split_images(splits: dict, name: str, classes: list[str], policy: ResizePolicy, labels: dict[str, int],
                 limit: int | None = None) -> LabeledImages:
    """A split's images preprocessed exactly as served (at most `limit`, spread over the split) and their labels."""
    from exporters.bundle import LabeledImages, spread_sample
    from exporters.errors import ExportError
    from exporters.preprocess import ImageDecodeError, load_model_input

    paths = splits.get(name) or []
    if limit is not None and len(paths) > limit:
        paths = [paths[i] for i in spread_sample(len(paths), limit)]
    images, ys = [], []
    for p in paths:
        ys.append(_label_of(p, name, classes, labels, splits.get("origin")))
        try:
            images.append(load_model_input(p, policy))
        except FileNotFoundError:
            raise ExportError(f"{name} image {p} listed in splits.json does not exist; relative paths are relative to the "
                              "folder `cnnloop train` ran in: run export from there, or restore the data") from None
        except ImageDecodeError as e:
            raise ExportError(f"{name} image {p} no longer decodes ({e}); restore the data the run was trained on") from None
    if not images:
        return LabeledImages(np.zeros((0, policy.crop_size, policy.crop_size, 3), np.uint8), np.zeros(0, np.int64))
    return LabeledImages(np.stack(images), np.asarray(ys, dtype=np.int64))


def run_description(run_dir: Path, info: dict, splits: dict, classes: list[str], labels: dict[str, int]) -> RunDescription:
    import yaml

    from exporters.bundle import RunDescription, dataset_fingerprint
    from training.run_dir import CONFIG, METRICS, read_json

    config = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    metrics = read_json(run_dir / METRICS) if (run_dir / METRICS).is_file() else {}
    return RunDescription(backbone=info["backbone"], training_config=config, metrics=metrics,
                          dataset_fingerprint=dataset_fingerprint(splits.get("train") or []),
                          train_class_counts=split_class_counts(splits, "train", classes, labels),
                          source_run=str(run_dir.resolve()))


@dataclass
class ExportInputs:
    run: LoadedRun
    val: LabeledImages
    train_images: np.ndarray
    description: RunDescription


def read_export_inputs(run_dir: Path) -> ExportInputs:
    """Everything export_bundle needs from a run dir: the model, val images + labels, a train sample."""
    from exporters.bundle import TRAIN_SAMPLE
    from exporters.errors import ExportError
    from training.run_dir import SPLITS, load_run, read_json

    run = load_run(run_dir)
    if not (run_dir / SPLITS).is_file():
        raise ExportError(f"{run_dir / SPLITS} is missing; the export needs the run's val/train image lists (retrain the run)")
    splits = read_json(run_dir / SPLITS)
    labels = split_labels(splits, run.classes)
    console.print(f"decoding {len(splits.get('val') or [])} val and up to {TRAIN_SAMPLE} train images ...", highlight=False)
    val = split_images(splits, "val", run.classes, run.policy, labels)
    # A sample is enough: training images serve int8 calibration and the PCA fit only.
    train = split_images(splits, "train", run.classes, run.policy, labels, limit=TRAIN_SAMPLE)
    return ExportInputs(run, val, train.images, run_description(run_dir, run.info, splits, run.classes, labels))


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        run_dir: Path = typer.Argument(..., help="A finished training run (the --out of `cnnloop train`).", show_default=False),
        registry_uri: str = typer.Option(None, "--registry", envvar="CNNLOOP_REGISTRY",
                                         help="Registry: a local folder or s3://bucket/prefix (env CNNLOOP_REGISTRY)."),
        endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3 endpoint for S3-compatible stores (MinIO, ...)."),
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
        if not registry_uri:
            fail("no registry given: pass --registry PATH|s3://bucket/prefix or set CNNLOOP_REGISTRY", EXIT_BAD_INPUT)
        if promote is not None and promote not in PROMOTE_ALIASES:
            fail(f"--promote must be one of {', '.join(PROMOTE_ALIASES)}, not '{promote}'", EXIT_BAD_INPUT)

        from exporters.bundle import export_bundle
        from exporters.registry import Registry
        from exporters.variants import parse_variants

        with guarded():
            wanted = parse_variants(variants)
            # Registry first: an unreachable store fails in a second (exit 3), not after a minute of
            # exporting. Reading the production alias is that check, and gives the default parent:
            # a new export descends from what is serving (None for a registry's first version).
            registry = Registry.open(registry_uri, endpoint_url=endpoint_url)
            production = registry.resolve("production")
            if parent:
                registry.show(parent)  # an unknown --parent is refused now, not recorded as a dangling link
            parent_version = parent or production
            inputs = read_export_inputs(run_dir)
            run = inputs.run
            with tempfile.TemporaryDirectory(prefix="cnnloop-bundle-") as tmp:
                bundle_dir, metadata = export_bundle(
                    run.model, run.classes, run.policy, inputs.description, inputs.val, inputs.train_images,
                    Path(tmp) / "bundle", wanted,
                    max_accuracy_drop, parent_version, log=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
                )
                version = registry.publish(bundle_dir, metadata)
            if promote:
                registry.promote(version, promote)
        kept = [n for n, v in metadata["variants"].items() if not v["refused"]]
        console.print(f"published version {version} to {registry_uri} (variants: {', '.join(kept)}"
                      + (f"; refused: {', '.join(metadata['refused_variants'])}" if metadata["refused_variants"] else "")
                      + (f"; alias {promote} -> {version}" if promote else "") + ")", highlight=False, soft_wrap=True)
        if json_out:
            emit_json({"version": version, "metadata": metadata}, json_out)
        if json_out != "-":
            typer.echo(version)
