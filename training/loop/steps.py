"""The fine-tuning step, read top to bottom: optimiser groups, LR schedule, unfreezing plan,
early stopping, one epoch of training, batched prediction."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.config import TrainConfig
from training.devices import resolve_device  # noqa: F401  (re-exported: fit, cv, evaluate import it from here)
from training.model.classifier import Classifier


def open_stages_at(epoch: int, cfg: TrainConfig, n_stages: int) -> int:
    """How many backbone stages (from the top) train during `epoch` (0-based)."""
    if cfg.strategy == "freeze":
        return 0
    if cfg.strategy == "finetune":
        return n_stages
    if epoch < cfg.head_epochs:
        return 0
    limit = n_stages if cfg.unfreeze_blocks is None else min(cfg.unfreeze_blocks, n_stages)
    return min(limit, 1 + (epoch - cfg.head_epochs) // cfg.unfreeze_every)


def _split_decay(params: list[nn.Parameter]) -> tuple[list, list]:
    # Biases and norm scales get no weight decay: decaying them only hurts fine-tuning.
    return [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]


def make_param_groups(model: Classifier, cfg: TrainConfig) -> list[dict]:
    """Head at cfg.lr, backbone at cfg.lr * backbone_lr_ratio (discriminative learning rates)."""
    groups = []
    for name, params, lr in (("head", model.head_parameters(), cfg.lr),
                             ("backbone", model.backbone_parameters(), cfg.lr * cfg.backbone_lr_ratio)):
        decay, no_decay = _split_decay(params)
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def make_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = make_param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedule: linear warmup then cosine to zero (or constant), or one-cycle."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=min(0.5, max(0.05, cfg.warmup_epochs / cfg.epochs)),
        )
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without an improvement larger than `min_delta`."""

    mode: str = "min"  # "min" for losses, "max" for accuracies
    patience: int = 4
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record this epoch's value; True when it is a new best."""
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def autocast_for(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def to_model_input(batch_uint8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = batch_uint8.to(device, non_blocking=True).float().div_(255.0)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_step(model, criterion, optimizer, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               cfg: TrainConfig, scaler=None, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch forward and one optimiser update: (logits, loss, labels on `device`).

    The epochs of `fit_model` and the sweep of `cnnloop lr-find` both step through here, so the
    range test measures the loss of exactly the update training makes."""
    x = to_model_input(images, device, cfg.channels_last)
    if noise:
        x = (x + noise * torch.randn_like(x)).clamp_(0, 1)
    y = labels.to(device, non_blocking=True)
    with autocast_for(device, cfg.amp):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        # Clipping reads true gradients: unscale them from fp16 loss scaling first.
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return logits, loss, y


def train_one_epoch(model, criterion, optimizer, scheduler, loader, device, cfg: TrainConfig,
                    scaler=None, ema=None, noise: float = 0.0, on_batch=None) -> dict:
    model.train()
    from training.model.classifier import set_batchnorm_eval

    # Under torchrun `model` is the DDP wrapper, which hides the Classifier's stages.
    net = model.module if isinstance(model, DistributedDataParallel) else model
    set_batchnorm_eval(net, all_bn=cfg.bn == "frozen")
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        logits, loss, y = train_step(model, criterion, optimizer, images, labels, device, cfg, scaler, noise)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(net)
        n = len(y)
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        if on_batch:
            on_batch(n)
    return {"loss": total_loss / max(1, seen), "accuracy": correct / max(1, seen)}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64,
            channels_last: bool = True, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x C x C (already cropped) -> (probabilities N x K, embeddings N x D) as float32."""
    model.eval()
    probs, embs = [], []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i : i + batch_size], device, channels_last)
        with autocast_for(device, amp):
            e = model.embed(x)
            p = model.head(e).float().softmax(1)
        probs.append(p.cpu())
        embs.append(e.float().cpu())
    if not probs:
        return np.zeros((0, model.head.out_features), np.float32), np.zeros((0, model.head.in_features), np.float32)
    return torch.cat(probs).numpy(), torch.cat(embs).numpy()
