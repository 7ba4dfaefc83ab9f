"""A finished run directory -> a verified bundle -> a new registry version (what `cnnloop export` and
the retrain job both do).

Besides the ONNX graphs the bundle carries what the next retrain needs, so a CronJob pod with
nothing but the registry can warm-start: the torch weights and their description, and the
*original* training splits (the data every retrain replays; feedback is added fresh each time).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from exporters.bundle import export_bundle
from exporters.registry import Registry
from training.export_inputs import read_export_inputs
from training.run_dir import MODEL_INFO, SPLITS, WEIGHTS

BUNDLE_WEIGHTS = "weights.safetensors"
BUNDLE_WEIGHTS_INFO = "weights.json"
ORIGINAL_SPLITS = "original_splits.json"


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
                                             parent_version, log=log)
        shutil.copyfile(run_dir / WEIGHTS, bundle_dir / BUNDLE_WEIGHTS)
        shutil.copyfile(run_dir / MODEL_INFO, bundle_dir / BUNDLE_WEIGHTS_INFO)
        shutil.copyfile(original_splits or run_dir / SPLITS, bundle_dir / ORIGINAL_SPLITS)
        metadata["retrain"] = {"weights": BUNDLE_WEIGHTS, "weights_info": BUNDLE_WEIGHTS_INFO, "original_splits": ORIGINAL_SPLITS}
        version = registry.publish(bundle_dir, metadata)
    return version, metadata
