"""What a run directory holds and how to read it back: the checkpoint describes itself."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from exporters.model_store.bundle import WEIGHTS_FILE, WEIGHTS_INFO_FILE
from exporters.preprocess import ResizePolicy
from training.model.backbones import get_backbone_spec
from training.errors import TrainingError
from training.model.classifier import Classifier, build_classifier

# A bundle carries the weights under the same names, so rebuild_classifier reads both folders.
WEIGHTS = WEIGHTS_FILE
MODEL_INFO = WEIGHTS_INFO_FILE
CLASSES = "classes.json"
CONFIG = "config.yaml"
METRICS = "metrics.json"
SPLITS = "splits.json"
SKIPPED = "skipped_images.json"
CALIBRATION = "calibration.json"  # exporters.calibration.Calibration, fitted on val


@dataclass
class LoadedRun:
    model: Classifier
    classes: list[str]
    policy: ResizePolicy
    info: dict
    path: Path


def save_model(run_dir: Path, model: Classifier, info: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run_dir / WEIGHTS))
    (run_dir / MODEL_INFO).write_text(json.dumps(info, indent=2))
    (run_dir / CLASSES).write_text(json.dumps(info["classes"], indent=2))


def rebuild_classifier(weights: Path, info_path: Path) -> tuple[Classifier, dict]:
    """The trained classifier from its safetensors and the model.json describing it (no network)."""
    info = json.loads(Path(info_path).read_text())
    spec = get_backbone_spec(info["backbone"]["name"])
    model, _ = build_classifier(spec, num_classes=len(info["classes"]), weights="none", dropout=info.get("dropout", 0.0))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:
        raise TrainingError(f"{weights} does not match {Path(info_path).name}: {e}") from None
    return model.eval(), info


def load_run(run_dir: Path) -> LoadedRun:
    """Rebuild the trained classifier from a run directory alone (no network, no config file needed)."""
    run_dir = Path(run_dir)
    for name in (WEIGHTS, MODEL_INFO):
        if not (run_dir / name).is_file():
            raise TrainingError(f"{run_dir} is not a finished training run: {name} is missing (run `cnnloop train` first)")
    model, info = rebuild_classifier(run_dir / WEIGHTS, run_dir / MODEL_INFO)
    return LoadedRun(model, info["classes"], ResizePolicy(**info["policy"]), info, run_dir)


def write_splits(run_dir: Path, parts: dict, origin: dict, carved: list[str]) -> None:
    """splits.json: absolute path and class index of every image in each split (None = no such split)."""
    doc = {"origin": origin, "carved": carved, "labels": {}}
    for name, data in parts.items():
        doc[name] = None if data is None else [str(Path(p).resolve()) for p in data.paths]
        doc["labels"][name] = None if data is None else [int(y) for y in data.labels]
    write_json(Path(run_dir) / SPLITS, doc)


def read_split(run_dir: Path, name: str) -> tuple[list[str], np.ndarray]:
    """(paths, class indices) of one split of a run; empty when the run had no such split."""
    path = Path(run_dir) / SPLITS
    if not path.is_file():
        raise TrainingError(f"{path} is missing: this run predates split records; train it again")
    doc = read_json(path)
    paths, labels = doc.get(name) or [], (doc.get("labels") or {}).get(name)
    if paths and (labels is None or len(labels) != len(paths)):
        raise TrainingError(f"{path} lists no labels for its {name} split; train the run again")
    return paths, np.asarray(labels or [], dtype=np.int64)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))

