"""What `cnnloop export` needs from a run directory: the model, labeled val images, a train sample."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from exporters.bundle import TRAIN_SAMPLE, LabeledImages, RunDescription, dataset_fingerprint, spread_sample
from exporters.errors import ExportError
from exporters.preprocess import ImageDecodeError, ResizePolicy, load_model_input
from training.run_dir import CONFIG, METRICS, LoadedRun, load_run, read_json, read_split


@dataclass
class ExportInputs:
    run: LoadedRun
    val: LabeledImages
    train_images: np.ndarray
    description: RunDescription


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
    return ExportInputs(run, val, train.images, description)
