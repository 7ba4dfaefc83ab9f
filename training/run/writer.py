"""A fitted model becomes a run directory: weights, config, metrics (scored by the caller), split
lists and plots. `cnnloop train` and the retrain job's challenger both leave one; export reads it."""
from __future__ import annotations

from pathlib import Path

from training.config import TrainConfig, save_config
from training.data.splits import Splits
from training.loop.fit import FitResult
from training.scoring.plots import plot_confusion, plot_curves
from training.run.files import CONFIG, METRICS, SKIPPED, save_model, write_json, write_splits


def write_run(out: Path, fit: FitResult, splits: Splits, cfg: TrainConfig, info: dict, origin: dict, metrics: dict) -> None:
    """Write the run directory; `metrics` already holds the "val" (and "test") scores its confusion plots draw."""
    save_model(out, fit.model.cpu(), info)
    save_config(cfg, out / CONFIG)
    write_json(out / METRICS, metrics)
    write_json(out / SKIPPED, splits.skipped)
    write_splits(out, {k: getattr(splits, k) for k in ("train", "val", "test")}, origin, splits.carved)
    plot_curves(fit.history, out / "curves.png", fit.best_epoch)
    for name in ("val", "test"):
        if name in metrics:
            plot_confusion(metrics[name]["confusion_matrix"], info["classes"], out / f"confusion_{name}.png", f"{name} confusion")
