"""What one trial scores: the recipe it draws, trained and scored on validation data only.

With `folds`, the mean over K stratified folds of the held-out fold's score (val carved from the other
folds for early stopping), the same folds `cnnloop cv` uses; without, the score on the val split that
`cnnloop train` would use (given val/ or carved the same way). The test split is never decoded here.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from exporters.preprocess import ResizePolicy
from training.model.backbones import get_backbone_spec
from training.config import TrainConfig
from training.cv import fold_splits, mean_and_std
from training.data.splits import Splits, prepare_splits
from training.data.sources import discover
from training.errors import TrainingError
from training.loop.fit import fit_model, score_split, seed_everything
from training.data.decode import DecodedImages, decode_files
from training.linear_probe import frozen_features, probe_scores
from training.model.classifier import build_classifier
from training.progress import ProgressBars
from training.tune.study import ALIVE_AT

METRICS = {"accuracy": "val_accuracy", "macro_f1": "val_macro_f1"}


class TrialPrunedSignal(Exception):
    """Raised from the epoch hook when the pruner stops a trial; the study records it as PRUNED."""


class Objective:
    def __init__(self, data: Path, base: TrainConfig, space, folds: int | None, metric: str, device,
                 progress: ProgressBars, console: Console):
        source = discover(data)
        # The search never sees a test split: not decoded, not carved differently from `cnnloop train`'s.
        self._had_test = source.test is not None
        self.source = dataclasses.replace(source, test=None)
        if folds is not None and source.val is not None:
            raise TrainingError(f"--folds pools one labeled set, but {data} has a val/ split; "
                                f"drop --folds to tune on val/, or give {data}/train")
        self.base, self.space, self.folds, self.metric = base, space, folds, metric
        self.device, self.progress, self.console = device, progress, console
        self._decoded: dict[int, tuple[DecodedImages, list[dict]]] = {}
        self._splits: dict[tuple, Splits] = {}

    def config_for(self, params: dict) -> TrainConfig:
        return TrainConfig.model_validate({**self.base.model_dump(), **self.space.fixed, **params})

    def _policy(self, cfg: TrainConfig) -> tuple:
        spec = get_backbone_spec(cfg.backbone)
        return spec, spec.resize_policy(cfg.image_size)

    def _pool(self, size: int) -> tuple[DecodedImages, list[dict]]:
        if size not in self._decoded:
            self._decoded[size] = decode_files(self.source.train, size, f"decoding at {size} px", self.progress)
        return self._decoded[size]

    def _holdout(self, cfg: TrainConfig, policy: ResizePolicy) -> Splits:
        key = (policy.resize_size, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        if key not in self._splits:
            # With a test/ folder `train` carves no test from train; without one it does, so carve the same.
            carve = cfg.model_copy(update={"test_fraction": 0.0}) if self._had_test else cfg
            self._splits[key] = prepare_splits(self.source, carve, policy, self.progress)
        return self._splits[key]

    def evaluate(self, cfg: TrainConfig, trial=None) -> tuple[float, dict]:
        """(objective value, details) of one recipe; `trial` gets per-epoch reports and may prune it."""
        spec, policy = self._policy(cfg)
        epochs = 0

        def on_epoch(fold: int):
            def report(row: dict) -> None:
                nonlocal epochs
                epochs += 1
                if trial is None:
                    return
                trial.set_user_attr("epochs_trained", epochs)
                trial.set_user_attr(ALIVE_AT, time.time())  # the heartbeat fail_stale reads
                trial.report(row[METRICS[self.metric]], step=fold * cfg.epochs + row["epoch"])
                if trial.should_prune():
                    raise TrialPrunedSignal(f"pruned at fold {fold + 1}, epoch {row['epoch'] + 1}")
            return report

        if self.folds is None:
            splits = self._holdout(cfg, policy)
            seed_everything(cfg.seed)
            scores = self._fit_and_score(spec, cfg, policy, splits, splits.val, on_epoch(0))
            return scores[self.metric], {"epochs_trained": epochs, "val": scores}
        everything, skipped = self._pool(policy.resize_size)
        per_fold = []
        for k, (_, _, splits) in enumerate(fold_splits(everything, self.folds, cfg, skipped)):
            seed_everything(cfg.seed + k)
            per_fold.append(self._fit_and_score(spec, cfg, policy, splits, splits.test, on_epoch(k)))
        values = [s[self.metric] for s in per_fold]
        spread = mean_and_std(values)
        return spread["mean"], {"epochs_trained": epochs, "fold_values": values, "fold_std": spread["std"]}

    def _fit_and_score(self, spec, cfg, policy, splits: Splits, scored_on, hook) -> dict:
        model, _ = build_classifier(spec, len(splits.train.classes), cfg.weights, cfg.dropout)
        fit = fit_model(model, splits, cfg, policy, self.device, self.progress, self.console, on_epoch=hook)
        scores, _, _ = score_split(fit.model, scored_on, policy, self.device, cfg)
        return scores

    def probe_floor(self, cfg: TrainConfig) -> dict:
        """The linear probe of `cfg`'s backbone at its resolution, on the same folds or val split."""
        spec, policy = self._policy(cfg)
        if self.folds is None:
            splits = self._holdout(cfg, policy)
            tr = frozen_features(spec, cfg, splits.train.images, policy, self.device)
            va = frozen_features(spec, cfg, splits.val.images, policy, self.device)
            s = probe_scores(tr, splits.train.labels.numpy(), va, splits.val.labels.numpy(), splits.train.classes, cfg.seed)
            return {"value": s[self.metric], "scores": [s[self.metric]]}
        everything, skipped = self._pool(policy.resize_size)
        feats, labels = frozen_features(spec, cfg, everything.images, policy, self.device), everything.labels.numpy()
        values = []
        for k, (train_idx, test_idx, _) in enumerate(fold_splits(everything, self.folds, cfg, skipped)):
            s = probe_scores(feats[train_idx], labels[train_idx], feats[test_idx], labels[test_idx], everything.classes, cfg.seed + k)
            values.append(s[self.metric])
        return {"value": float(np.mean(values)), "scores": values}
