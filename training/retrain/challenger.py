"""Train the challenger: warm start from the champion's weights, fine-tune with early stopping, and
leave an ordinary run directory (weights, config, metrics, curves, confusion matrices) to export."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from exporters.model_store.bundle import Bundle
from exporters.preprocess import ResizePolicy
from training.config import TrainConfig, load_train_config
from training.loop.steps import resolve_device
from training.errors import TrainingError
from training.loop.fit import fit_model, seed_everything
from training.run.writer import write_run
from training.scoring.confidence import score_and_calibrate, write_confidence
from training.progress import make_progress
from training.retrain.dataset import RetrainData
from training.run.files import rebuild_classifier


def warm_start_config(champion: Bundle, epochs: int, lr_scale: float, patience: int, device: str) -> TrainConfig:
    """The champion's own recipe, shortened: the head is trained already, so no head-only epochs."""
    base = dict(champion.training_config)
    base.update(epochs=epochs, lr=float(base.get("lr", 2e-3)) * lr_scale, patience=patience, device=device,
                head_epochs=0, warmup_epochs=min(float(base.get("warmup_epochs", 1.0)), 0.5), weights="none")
    return load_train_config(None, base)


def load_champion_model(champion: Bundle):
    weights = champion.retrain.weights
    if not weights.is_file():
        raise TrainingError(f"bundle {champion.path.name} carries no torch weights ({weights.name}) to warm-start from; "
                            "re-export its run with this version of `cnnloop export`")
    return rebuild_classifier(weights, champion.retrain.weights_info)


def train_challenger(champion: Bundle, data: RetrainData, cfg: TrainConfig, out: Path, console: Console,
                     show_progress: bool = True) -> dict:
    """Fine-tune the champion on `data` into run directory `out`; returns its metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, info = load_champion_model(champion)
    policy = ResizePolicy(**info["policy"])
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    with make_progress(console, show_progress) as progress:
        fit = fit_model(model, data.splits, cfg, policy, device, progress, console)
    metrics = {"history": fit.history, "best_epoch": fit.best_epoch, "monitor": cfg.monitor, "device": str(device),
               "warm_start_from": champion.version, "data": data.counts}
    scores, calibration = score_and_calibrate(fit.model, data.splits, policy, device, cfg)
    metrics.update(scores)
    write_run(out, fit, data.splits, cfg, {**info, "best_epoch": fit.best_epoch}, {"retrain_of": metrics["warm_start_from"]}, metrics)
    write_confidence(out, calibration, metrics)
    return metrics
