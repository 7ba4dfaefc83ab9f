"""`cnnloop cv`: stratified k-fold cross-validation of a training recipe (mean +- std over folds)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from rich.console import Console

from training.model.backbones import get_backbone_spec
from training.config import TrainConfig
from training.data.splits import Splits
from training.data.sources import discover
from training.loop.steps import resolve_device
from training.errors import TrainingError
from training.loop.fit import FitResult, fit_model, score_split, seed_everything
from training.data.decode import DecodedImages, decode_files
from training.model.classifier import build_classifier
from training.progress import make_progress
from training.data.stratify import stratified_kfold, stratified_split

SUMMARY_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall")


def mean_and_std(values: list[float]) -> dict:
    """{"mean", "std"} of one score over folds; the sample std (ddof=1), 0 for a single fold."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarise_folds(fold_scores: list[dict]) -> dict:
    return {k: mean_and_std([f[k] for f in fold_scores]) for k in SUMMARY_KEYS}


def fold_splits(everything: DecodedImages, folds: int, cfg: TrainConfig, skipped: list[dict] | None = None):
    """Per fold: (train_idx, held-out idx, Splits) with val carved from the training folds for early
    stopping and the held-out fold as `test`. Same labels and seed, same folds (cv, tune, compare)."""
    for k, (train_idx, test_idx) in enumerate(stratified_kfold(everything.labels.numpy(), folds, cfg.seed)):
        pool = everything.subset(train_idx)
        keep, held = stratified_split(pool.labels.numpy(), cfg.val_fraction, cfg.seed + k)
        yield train_idx, test_idx, Splits(pool.subset(keep), pool.subset(held), everything.subset(test_idx),
                                          skipped or [], ["val", "test"])


def cross_validate(data: Path, cfg: TrainConfig, folds: int = 5, console: Console | None = None,
                   show_progress: bool = True, on_fold: Callable[[int, FitResult, Splits], None] | None = None) -> dict:
    """Each fold: train on the other folds (val carved from them for early stopping), score the fold;
    beside it, the linear probe on the same fold (training.linear_probe), the floor to beat.

    `on_fold(k, fit, splits)` sees each fold's fitted model and its splits (`cnnloop compare` keeps
    the last fold's model to export and checks every backbone held out the same files)."""
    from training.linear_probe import frozen_features, probe_scores

    console = console or Console(stderr=True)
    spec = get_backbone_spec(cfg.backbone)
    policy = spec.resize_policy(cfg.image_size)
    source = discover(data)
    if source.val is not None or source.test is not None:
        raise TrainingError(f"cv pools one labeled set; give {data}/train (or an ImageFolder), not a folder with val/ or test/")
    device = resolve_device(cfg.device)
    results = []
    with make_progress(console, show_progress) as progress:
        everything, skipped = decode_files(source.train, policy.resize_size, "decoding", progress)
        labels = everything.labels.numpy()
        # The backbone is frozen, so one pass gives every fold its features.
        features = frozen_features(spec, cfg, everything.images, policy, device)
        probes = []
        for k, (train_idx, test_idx, splits) in enumerate(fold_splits(everything, folds, cfg, skipped)):
            seed_everything(cfg.seed + k)
            model, _ = build_classifier(spec, len(everything.classes), cfg.weights, cfg.dropout)
            started = time.perf_counter()
            fit = fit_model(model, splits, cfg, policy, device, progress, console)
            fit_seconds = time.perf_counter() - started
            scores, _, _ = score_split(fit.model, splits.test, policy, device, cfg)
            probe = probe_scores(features[train_idx], labels[train_idx], features[test_idx], labels[test_idx],
                                 everything.classes, cfg.seed + k)
            console.print(f"fold {k + 1}/{folds}: accuracy {scores['accuracy']:.4f} macro-F1 {scores['macro_f1']:.4f} "
                          f"(best epoch {fit.best_epoch}); linear probe {probe['accuracy']:.4f}")
            if on_fold is not None:
                on_fold(k, fit, splits)
            results.append({"fold": k, "n_test": scores["n"], "best_epoch": fit.best_epoch, "fit_seconds": fit_seconds,
                            **{key: scores[key] for key in SUMMARY_KEYS}})
            probes.append({"fold": k, "C": probe["C"], "inner_folds": probe["inner_folds"],
                           **{key: probe[key] for key in SUMMARY_KEYS}})
    summary, floor = summarise_folds(results), summarise_folds(probes)
    return {"folds": results, "summary": summary, "k": folds, "skipped_images": skipped,
            "linear_probe": {"folds": probes, "summary": floor,
                             "what": f"frozen {cfg.backbone} features at {policy.crop_size} px, logistic regression, "
                                     "C by inner stratified CV on each fold's training data"},
            "beats_linear_probe": summary["accuracy"]["mean"] > floor["accuracy"]["mean"],
            "config": cfg.model_dump(mode="json")}
