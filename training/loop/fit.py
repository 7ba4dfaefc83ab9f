"""The fine-tuning loop, read top to bottom: per epoch, open the scheduled stages, train one epoch,
score val, keep the best weights, stop early. The rules it applies live in `training.loop.steps`."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DistributedSampler

from exporters.preprocess import ResizePolicy
from training.data import augment
from training.loop import distributed
from training.config import TrainConfig
from training.data.splits import Splits
from training.loop.steps import EarlyStopping, make_optimizer, make_scheduler, open_stages_at, predict, train_one_epoch
from training.data.decode import DecodedImages
from training.scoring.metrics import classification_scores
from training.progress import ProgressBars
from training.loop.batches import make_criterion, make_train_loader


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def score_split(model, data: DecodedImages, policy: ResizePolicy, device, cfg: TrainConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    """Scores, probabilities and embeddings of `model` on one split, centre-cropped as served."""
    probs, embs = predict(model, augment.eval_crop(data.images, policy), device, cfg.batch_size * 2, cfg.channels_last, cfg.amp)
    return classification_scores(data.labels.numpy(), probs, data.classes), probs, embs


@dataclass
class FitResult:
    model: torch.nn.Module  # best weights restored, all stages open, eval mode
    history: list[dict]
    best_epoch: int
    replica_fingerprints: list[str] | None = None  # one per torchrun worker, all equal; None in one process


def grad_scaler(device: torch.device, cfg: TrainConfig):
    # bf16 autocast needs no loss scaling; only fp16 (GPUs without bf16) does.
    use = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda") if use else None


def _ema(model, cfg: TrainConfig):
    if not cfg.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def fit_model(model, splits: Splits, cfg: TrainConfig, policy: ResizePolicy, device: torch.device,
              progress: ProgressBars, console: Console, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """The fine-tuning loop: unfreeze on schedule, train an epoch, score val, stop early, keep the best.

    `on_epoch` sees each epoch's history row once it is scored (the tuner reports it to its pruner);
    whatever it raises stops the fit and propagates."""
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loader = make_train_loader(splits.train, cfg, policy, device)
    criterion = make_criterion(splits.train, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    scaler = grad_scaler(device, cfg)
    ema = _ema(model, cfg)
    eval_model = ema.module if ema else model
    world = distributed.world_size()
    if world > 1:
        # Every rank built the same initial weights from cfg.seed; from here on each draws its own
        # dropout masks and augmentations.
        torch.manual_seed(cfg.seed + distributed.rank())

    stopper = EarlyStopping(mode="min" if cfg.monitor == "val_loss" else "max", patience=cfg.patience, min_delta=cfg.min_delta)
    history, best_state = [], None
    step_model, wrapped_for = model, None
    noise = augment.noise_std(cfg.augment)
    for epoch in range(cfg.epochs):
        open_now = open_stages_at(epoch, cfg, len(model.stages))
        model.set_trainable(open_now)
        eval_model.frozen_stages = model.frozen_stages
        if world > 1 and open_now != wrapped_for:
            # DDP hooks only the parameters that require grad when it is built: a stage opened later
            # would train unsynchronised on each rank (the replica check below then fails the run).
            # One wrapper over everything with find_unused_parameters=True ends bit-identical too, but
            # walks the autograd graph and all-reduces the frozen stages every step: 1.4x slower on
            # 2 CPU workers at 96 px. A new wrapper per unfreezing step costs one broadcast.
            step_model, wrapped_for = distributed.wrap_for_training(model, device), open_now
        if isinstance(loader.sampler, (DistributedSampler, distributed.DistributedWeightedSampler)):
            loader.sampler.set_epoch(epoch)
        task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(loader.dataset), info=f"open stages {open_now}")
        t0 = time.perf_counter()
        stats = train_one_epoch(step_model, criterion, optimizer, scheduler, loader, device, cfg, scaler, ema, noise,
                                on_batch=lambda n: progress.advance(task, n))
        train_s = time.perf_counter() - t0
        stats = distributed.average(stats)
        if cfg.bn == "train":
            distributed.average_batchnorm_stats(model)
            if ema:
                distributed.average_batchnorm_stats(eval_model)
        val_scores, _, _ = score_split(eval_model, splits.val, policy, device, cfg)
        row = distributed.broadcast_from_main({
            "epoch": epoch, "open_stages": open_now, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
            "val_loss": val_scores["loss"], "val_accuracy": val_scores["accuracy"], "val_macro_f1": val_scores["macro_f1"],
            "lr_head": optimizer.param_groups[0]["lr"], "train_images_per_s": len(loader.dataset) / train_s,
        })
        history.append(row)
        improved = stopper.step(row[cfg.monitor], epoch)
        if improved:
            best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
        progress.update(task, info=f"loss {stats['loss']:.3f} val_loss {row['val_loss']:.3f} "
                                   f"val_acc {row['val_accuracy']:.3f}{' *' if improved else ''}")
        if on_epoch is not None:
            on_epoch(row)
        if stopper.should_stop:
            console.print(f"early stop after epoch {epoch + 1}: no {cfg.monitor} improvement for {cfg.patience} epochs")
            break
    eval_model.load_state_dict(best_state)
    eval_model.set_trainable(None)
    eval_model.eval()
    replicas = distributed.require_identical_replicas(eval_model) if world > 1 else None
    return FitResult(eval_model, history, stopper.best_epoch, replicas)
