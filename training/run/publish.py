"""A finished run directory -> a verified bundle -> a new registry version (what `cnnloop export` and
the retrain job both do).

Besides the ONNX graphs the bundle carries what the next retrain needs, so a CronJob pod with
nothing but the registry can warm-start: the torch weights and their description, and the
*original* training splits (the data every retrain replays; feedback is added fresh each time).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from exporters.model_store.bundle import ORIGINAL_SPLITS_FILE, WEIGHTS_FILE, WEIGHTS_INFO_FILE, retrain_metadata
from exporters.calibration import Calibration
from exporters.export.bundle_writer import TRAIN_SAMPLE, LabeledImages, RunDescription, dataset_fingerprint, export_bundle, spread_sample
from exporters.errors import ExportError
from exporters.preprocess import ImageDecodeError, ResizePolicy, load_model_input
from exporters.model_store.registry import Registry
from training.run.files import CALIBRATION, CONFIG, METRICS, MODEL_INFO, SPLITS, WEIGHTS, LoadedRun, load_run, read_json, read_split


@dataclass
class ExportInputs:
    """What export_bundle needs from a run directory: the model, labeled val images, a train sample."""

    run: LoadedRun
    val: LabeledImages
    train_images: np.ndarray
    description: RunDescription
    calibration: Calibration | None  # None: a run trained before cnnloop calibrated; its bundle is served raw


def split_images(paths: list[str], labels: np.ndarray, policy: ResizePolicy, name: str,
                 limit: int | None = None) -> LabeledImages:
    """A split's images preprocessed exactly as served (at most `limit`, spread over the split)."""
    if limit is not None and len(paths) > limit:
        keep = spread_sample(len(paths), limit)
        paths, labels = [paths[i] for i in keep], labels[keep]
    images = []
    for p in paths:
        try:
            images.append(load_model_input(p, policy))
        except (FileNotFoundError, ImageDecodeError) as e:
            raise ExportError(f"{name} image {p} listed in splits.json cannot be read ({e}); restore the data the run was trained on") from None
    if not images:
        return LabeledImages(np.zeros((0, policy.crop_size, policy.crop_size, 3), np.uint8), np.zeros(0, np.int64))
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64))


def read_export_inputs(run_dir: Path) -> ExportInputs:
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    train_paths, train_labels = read_split(run_dir, "train")
    val_paths, val_labels = read_split(run_dir, "val")
    val = split_images(val_paths, val_labels, run.policy, "val")
    # A sample is enough: training images serve int8 calibration and the PCA fit only.
    train = split_images(train_paths, train_labels, run.policy, "train", limit=TRAIN_SAMPLE)
    config = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    metrics = read_json(run_dir / METRICS) if (run_dir / METRICS).is_file() else {}
    description = RunDescription(
        backbone=run.info["backbone"], training_config=config, metrics=metrics,
        dataset_fingerprint=dataset_fingerprint(train_paths),
        train_class_counts=np.bincount(train_labels, minlength=len(run.classes)).tolist(),
        source_run=str(run_dir.resolve()),
    )
    calibration = Calibration.from_json(read_json(run_dir / CALIBRATION)) if (run_dir / CALIBRATION).is_file() else None
    return ExportInputs(run, val, train.images, description, calibration)


def publish_run(run_dir: Path, registry: Registry, variants: Sequence[str], max_accuracy_drop: float,
                parent_version: str | None, original_splits: Path | None = None,
                log: Callable[[str], None] = lambda _: None) -> tuple[str, dict]:
    """Export `run_dir` and publish it; `original_splits` defaults to the run's own splits.json."""
    run_dir = Path(run_dir)
    inputs = read_export_inputs(run_dir)
    run = inputs.run
    with tempfile.TemporaryDirectory(prefix="cnnloop-bundle-") as tmp:
        bundle_dir, metadata = export_bundle(run.model, run.classes, run.policy, inputs.description, inputs.val,
                                             inputs.train_images, Path(tmp) / "bundle", variants, max_accuracy_drop,
                                             parent_version, calibration=inputs.calibration, log=log)
        shutil.copyfile(run_dir / WEIGHTS, bundle_dir / WEIGHTS_FILE)
        shutil.copyfile(run_dir / MODEL_INFO, bundle_dir / WEIGHTS_INFO_FILE)
        shutil.copyfile(original_splits or run_dir / SPLITS, bundle_dir / ORIGINAL_SPLITS_FILE)
        metadata["retrain"] = retrain_metadata()
        version = registry.publish(bundle_dir, metadata)
    return version, metadata
