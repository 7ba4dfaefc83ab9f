"""Train the challenger: warm start from the champion's weights, fine-tune with early stopping, and
leave an ordinary run directory (weights, config, metrics, curves, confusion matrices) to export."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from safetensors.torch import load_file

from exporters.onnx_runtime import read_bundle_metadata
from exporters.preprocess import ResizePolicy
from training.backbones import get_backbone_spec
from training.config import TrainConfig, load_train_config
from training.engine import resolve_device
from training.errors import TrainingError
from training.fit import fit_model, seed_everything, write_run
from training.model import build_classifier
from training.progress import make_progress
from training.publish import BUNDLE_WEIGHTS, BUNDLE_WEIGHTS_INFO
from training.retrain.dataset import RetrainData


def warm_start_config(champion_meta: dict, epochs: int, lr_scale: float, patience: int, device: str) -> TrainConfig:
    """The champion's own recipe, shortened: the head is trained already, so no head-only epochs."""
    base = dict((champion_meta.get("training") or {}).get("config") or {})
    base.update(epochs=epochs, lr=float(base.get("lr", 2e-3)) * lr_scale, patience=patience, device=device,
                head_epochs=0, warmup_epochs=min(float(base.get("warmup_epochs", 1.0)), 0.5), weights="none")
    return load_train_config(None, base)


def load_champion_model(bundle_dir: Path):
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / BUNDLE_WEIGHTS).is_file():
        raise TrainingError(f"bundle {bundle_dir.name} carries no torch weights ({BUNDLE_WEIGHTS}) to warm-start from; "
                            "re-export its run with this version of `cnnloop export`")
    info = json.loads((bundle_dir / BUNDLE_WEIGHTS_INFO).read_text())
    model, _ = build_classifier(get_backbone_spec(info["backbone"]["name"]), len(info["classes"]), "none", info.get("dropout", 0.0))
    model.load_state_dict(load_file(str(bundle_dir / BUNDLE_WEIGHTS)))
    return model, info


def train_challenger(champion_dir: Path, data: RetrainData, cfg: TrainConfig, out: Path, console: Console,
                     show_progress: bool = True) -> dict:
    """Fine-tune the champion on `data` into run directory `out`; returns its metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, info = load_champion_model(champion_dir)
    policy = ResizePolicy(**info["policy"])
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    with make_progress(console, show_progress) as progress:
        fit = fit_model(model, data.splits, cfg, policy, device, progress, console)
    metrics = {"history": fit.history, "best_epoch": fit.best_epoch, "monitor": cfg.monitor, "device": str(device),
               "warm_start_from": read_bundle_metadata(champion_dir).get("version"), "data": data.counts}
    write_run(out, fit, data.splits, cfg, policy, device, {**info, "best_epoch": fit.best_epoch},
              {"retrain_of": metrics["warm_start_from"]}, metrics)
    return metrics
