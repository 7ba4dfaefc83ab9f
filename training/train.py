"""`cnnloop train`: data -> splits -> fine-tune with early stopping -> scores, plots, run directory."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from training.loop import distributed
from training.model.backbones import get_backbone_spec
from training.config import TrainConfig
from training.data.splits import Splits, class_counts_by_split, prepare_splits
from training.data.sources import discover
from training.loop.steps import resolve_device
from training.errors import TrainingError
from training.loop.fit import fit_model, seed_everything
from training.model.classifier import build_classifier
from training.progress import make_progress
from training.run.files import METRICS, SKIPPED
from training.run.writer import write_run
from training.scoring.confidence import score_and_calibrate, write_confidence


def train(data: Path, out: Path, cfg: TrainConfig, test_dir: Path | None = None, overwrite: bool = False,
          console: Console | None = None, show_progress: bool = True) -> dict:
    """Fine-tune per `cfg` and write the run directory `out`. Returns the metrics dict.

    Under torchrun (see training.loop.distributed) every worker trains and returns the same metrics;
    rank 0 alone prints and writes `out`."""
    launch = distributed.read_launch_env()
    console = console or Console(stderr=True)
    if not launch.is_main:
        # One log per job: the other workers would repeat every line of rank 0's.
        console, show_progress = Console(stderr=True, quiet=True), False
    out = Path(out)
    if (out / METRICS).exists() and not overwrite:
        raise TrainingError(f"{out} already holds a training run; choose another --out or pass --overwrite")
    spec = get_backbone_spec(cfg.backbone)
    policy = spec.resize_policy(cfg.image_size)
    source = discover(data, test_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with distributed.process_group(launch, resolve_device(cfg.device)) as device:
        seed_everything(cfg.seed)
        # The weights cache lives in the run dir: rank 0 fills it, the others only read it.
        with distributed.main_process_first():
            model, weights_desc = build_classifier(spec, len(source.train.classes), cfg.weights, cfg.dropout, out / ".weights-cache")
        if launch.is_main:
            out.mkdir(parents=True, exist_ok=True)

        with make_progress(console, show_progress) as progress:
            splits = prepare_splits(source, cfg, policy, progress)
            counts = _report_splits(splits, out, console)
            fit = fit_model(model, splits, cfg, policy, device, progress, console)
        if not launch.is_main:
            return distributed.broadcast_from_main(None)

        metrics = {"history": fit.history, "best_epoch": fit.best_epoch, "monitor": cfg.monitor, "class_counts": counts,
                   "carved_splits": splits.carved, "skipped_images": len(splits.skipped), "device": str(device)}
        if fit.replica_fingerprints:
            metrics["distributed"] = {"world_size": launch.world_size, "weights_sha256": fit.replica_fingerprints}
        info = {"backbone": spec.describe(), "weights": weights_desc, "classes": splits.train.classes, "policy": policy.as_dict(),
                "dropout": cfg.dropout, "embed_dim": int(fit.model.head.in_features), "best_epoch": fit.best_epoch}
        scores, calibration = score_and_calibrate(fit.model, splits, policy, device, cfg)
        metrics.update(scores)
        write_run(out, fit, splits, cfg, info, source.origin, metrics)
        write_confidence(out, calibration, metrics)
        return distributed.broadcast_from_main(metrics)


def _report_splits(splits: Splits, out: Path, console: Console) -> dict:
    """Warn about skipped images and print the class counts per split (which the metrics record too)."""
    if splits.skipped:
        console.print(f"[yellow]warning:[/] skipped {len(splits.skipped)} undecodable image(s), listed in {out / SKIPPED}:")
        for s in splits.skipped[:10]:
            console.print(f"  {s['path']}: {s['reason']}", highlight=False)
    counts = class_counts_by_split(splits)
    console.print(f"class counts: {counts}  (carved from train: {', '.join(splits.carved) or 'none'})", highlight=False)
    return counts
