"""`cnnloop lr-find`: the learning-rate range test (Leslie Smith 2015; fastai's `lr_find`).

Train on the recipe's train split while the head LR grows exponentially from `start_lr` to `end_lr`,
backbone groups kept at `backbone_lr_ratio` of it, record the loss, then put every weight back.
The suggestion functions are pure and read arrays; `find_lr` is the shell that builds what
`cnnloop train` would build.
"""
from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn

from training.data import augment
from training.model.backbones import get_backbone_spec
from training.config import TrainConfig, load_train_config
from training.data.splits import prepare_splits
from training.data.sources import discover
from training.loop.steps import make_optimizer, open_stages_at, resolve_device, train_step
from training.errors import TrainingError
from training.loop.fit import grad_scaler, seed_everything
from training.model.classifier import build_classifier, set_batchnorm_eval
from training.progress import make_progress
from training.loop.batches import make_criterion, make_train_loader


def check_sweep(start_lr: float, end_lr: float, steps: int) -> None:
    if not 0 < start_lr < end_lr:
        raise TrainingError(f"--start-lr ({start_lr:g}) must be positive and below --end-lr ({end_lr:g}); e.g. 1e-7 and 10")
    if steps < 10:
        raise TrainingError(f"--steps {steps} is too few to read a loss curve from; use at least 10 (100 is usual)")


@dataclass
class SmoothedLoss:
    """Exponential moving average with bias correction, as fastai: early points are not pulled to 0.
    Fed one loss at a time, so the sweep can stop the moment the smoothed loss diverges."""

    beta: float = 0.98
    avg: float = 0.0
    n: int = 0

    def add(self, loss: float) -> float:
        """Take the next raw loss; the smoothed loss up to it."""
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        return self.avg / (1 - self.beta**self.n)


def _window(n: int) -> slice:
    # As fastai: the first tenth is noise from a barely moving model, the last points are the blow-up.
    lo, hi = n // 10, n - min(5, n // 10)
    return slice(lo, hi) if hi - lo >= 3 else slice(0, n)


def suggest_steepest(lrs, losses) -> int:
    """Index of the most negative slope of the loss against log(lr)."""
    w = _window(len(losses))
    grads = np.gradient(np.asarray(losses, float)[w], np.log(np.asarray(lrs, float)[w]))
    return int(w.start + np.argmin(grads))


def suggest_valley(lrs, losses) -> int:
    """fastai's valley: the longest strictly descending (sub)sequence of the loss, and the point 2/3 down it.

    (fastai's code lands about half way down; 2/3 takes a slightly larger, still descending, lr.)"""
    w = _window(len(losses))
    y = np.asarray(losses, float)[w]
    length = [1] * len(y)  # length[i]: longest strictly descending subsequence ending at i
    for i in range(len(y)):
        for j in range(i):
            if y[i] < y[j]:
                length[i] = max(length[i], length[j] + 1)
    end = int(np.argmax(length))
    # As fastai, the run is taken to span its length back from its end: noise it skipped counts as part of it.
    start = max(0, end - length[end] + 1)
    return w.start + start + int(round(2 / 3 * (end - start)))


def suggest_minimum(lrs, losses) -> float:
    """A tenth of the lr at the lowest loss: the minimum itself is already too hot to train at."""
    w = _window(len(losses))
    return float(np.asarray(lrs, float)[w][np.argmin(np.asarray(losses, float)[w])] / 10)


def range_test(model: nn.Module, loader, criterion, cfg: TrainConfig, device: torch.device, start_lr: float = 1e-7,
               end_lr: float = 10.0, steps: int = 100, beta: float = 0.98, diverge: float = 4.0, on_step=None) -> dict:
    """Sweep and record; `model`'s state_dict (BatchNorm stats too) and the RNG states come back unchanged."""
    saved = copy.deepcopy(model.state_dict())
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           np.random.get_state(), random.getstate())
    was_training, frozen = model.training, model.frozen_stages
    requires = [p.requires_grad for p in model.parameters()]
    optimizer = make_optimizer(model, cfg)
    ratios = [g["lr"] / cfg.lr for g in optimizer.param_groups]
    scaler, noise = grad_scaler(device, cfg), augment.noise_std(cfg.augment)
    points, best, diverged, smoother = [], math.inf, False, SmoothedLoss(beta)
    try:
        model.train()
        set_batchnorm_eval(model, all_bn=cfg.bn == "frozen")
        batches = iter(loader)
        for step in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
            for g, r in zip(optimizer.param_groups, ratios):
                g["lr"] = lr * r
            try:
                images, labels = next(batches)
            except StopIteration:  # a small train split: cycle it
                batches = iter(loader)
                images, labels = next(batches)
            _, loss, _ = train_step(model, criterion, optimizer, images, labels, device, cfg, scaler, noise)
            raw = float(loss.item())
            smoothed = smoother.add(raw)
            points.append({"step": step, "lr_head": lr, "loss": raw, "smoothed_loss": smoothed,
                           "lrs": {g["name"]: g["lr"] for g in optimizer.param_groups}})
            best = min(best, smoothed)
            if on_step:
                on_step(points[-1])
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                diverged = True
                break
    finally:
        model.load_state_dict(saved)
        model.frozen_stages = frozen
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        np.random.set_state(rng[2])
        random.setstate(rng[3])
    groups = [{"name": g["name"], "lr_ratio": r, "weight_decay": g["weight_decay"],
               "n_params": sum(p.numel() for p in g["params"])} for g, r in zip(optimizer.param_groups, ratios)]
    return {"points": points, "param_groups": groups, "diverged": diverged, "stopped_early": len(points) < steps,
            "steps": steps, "start_lr": start_lr, "end_lr": end_lr, "beta": beta, "diverge": diverge}


def summarise(sweep: dict) -> dict:
    """Add the suggestions (head lr and what each param group would get) to a `range_test` result."""
    lrs = [p["lr_head"] for p in sweep["points"]]
    losses = [p["smoothed_loss"] for p in sweep["points"]]
    if len(lrs) < 3:
        raise TrainingError(f"the loss diverged after {len(lrs)} step(s) of the sweep; lower --start-lr")
    ratio = {g["name"]: g["lr_ratio"] for g in sweep["param_groups"]}
    backbone = ratio.get("backbone", ratio.get("backbone_no_decay"))

    def entry(head_lr: float, how: str) -> dict:
        return {"head_lr": head_lr, "backbone_lr": head_lr * backbone if backbone else None, "how": how}

    suggestions = {
        "valley": entry(lrs[suggest_valley(lrs, losses)], "2/3 down the longest descent of the smoothed loss"),
        "steepest": entry(lrs[suggest_steepest(lrs, losses)], "steepest descent of the smoothed loss vs log lr"),
        "minimum/10": entry(suggest_minimum(lrs, losses), "a tenth of the lr at the lowest smoothed loss"),
    }
    lr = float(f"{suggestions['valley']['head_lr']:.3g}")
    groups = [{**g, "suggested_lr": lr * g["lr_ratio"]} for g in sweep["param_groups"]]
    return {**sweep, "param_groups": groups, "suggestions": suggestions, "recommended": "valley", "lr": lr}


def find_lr(data: Path, cfg: TrainConfig, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            beta: float = 0.98, diverge: float = 4.0, console: Console | None = None, show_progress: bool = True) -> dict:
    """The range test on the model and train split `cnnloop train DATA` would build from `cfg`."""
    check_sweep(start_lr, end_lr, steps)
    if diverge <= 1:
        raise TrainingError(f"--diverge {diverge:g} would stop at the first wiggle; use a factor above 1 (4 is usual)")
    console = console or Console(stderr=True)
    spec = get_backbone_spec(cfg.backbone)
    policy = spec.resize_policy(cfg.image_size)
    source = discover(data)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    with make_progress(console, show_progress) as progress:
        splits = prepare_splits(source, cfg, policy, progress)
        model, weights_desc = build_classifier(spec, len(splits.train.classes), cfg.weights, cfg.dropout)
        model.to(device)
        if cfg.channels_last and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        # The stages a gradual schedule opens first after its head-only epochs: the LR that matters there.
        open_stages = open_stages_at(cfg.head_epochs, cfg, len(model.stages))
        model.set_trainable(open_stages)
        loader = make_train_loader(splits.train, cfg, policy, device)
        task = progress.add_task("lr range test", total=steps, info=f"open stages {open_stages}")

        def on_step(p: dict) -> None:
            progress.update(task, advance=1, info=f"lr {p['lr_head']:.2e} loss {p['smoothed_loss']:.3f}")

        sweep = range_test(model, loader, make_criterion(splits.train, cfg, device), cfg, device,
                           start_lr, end_lr, steps, beta, diverge, on_step)
    result = summarise(sweep)
    return {**result, "open_stages": open_stages, "n_stages": len(model.stages), "train_images": len(splits.train),
            "weights": weights_desc, "device": str(device), "config": cfg.model_dump(mode="json")}


def read_recipe(config: Path) -> tuple[str, dict]:
    """(text, mapping) of the --apply file, or a TrainingError; checked before the sweep and again on writing."""
    config = Path(config)
    text = config.read_text() if config.exists() else ""
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TrainingError(f"{config} is not valid YAML ({e}); fix it or pick another --apply file") from None
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise TrainingError(f"{config} holds a YAML {type(settings).__name__}, not a mapping of recipe keys; "
                            "--apply writes `lr:` into a mapping (fix the file or pick another)")
    return text, settings


def apply_lr(config: Path, lr: float) -> tuple[float | None, float]:
    """Write `lr: <lr>` into the YAML recipe `config` (created if absent, other keys kept); (old lr, new lr)."""
    config = Path(config)
    text, settings = read_recipe(config)
    old, settings["lr"] = settings.get("lr"), lr
    load_train_config(None, settings, environ={})  # refuse to write a recipe `cnnloop train` would reject
    line = yaml.safe_dump({"lr": lr}).strip()  # "1.0e-05", not "1e-05", which YAML 1.1 reads as a string
    # A line edit keeps the file's comments and key order; a full dump is the fallback (flow-style YAML...).
    if old is None:
        edited = text + ("\n" if text and not text.endswith("\n") else "") + line + "\n"
    else:
        edited = re.sub(r"(?m)^lr:.*$", line, text, count=1)
    try:
        kept = yaml.safe_load(edited) == settings
    except yaml.YAMLError:
        kept = False
    config.write_text(edited if kept else yaml.safe_dump(settings, sort_keys=False))
    return old, lr
