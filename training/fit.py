"""`cnnloop train`: data -> splits -> fine-tune with early stopping -> scores, plots, run directory."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from exporters.preprocess import ResizePolicy
from training import augment, distributed
from training.backbones import get_backbone_spec
from training.config import TrainConfig, save_config
from training.datasets import DataSource, discover
from training.engine import EarlyStopping, make_optimizer, make_scheduler, open_stages_at, predict, resolve_device, train_one_epoch
from training.errors import TrainingError
from training.image_cache import DecodedImages, decode_files
from training.metrics import classification_scores
from training.model import build_classifier
from training.plots import plot_confusion, plot_curves
from training.progress import ProgressBars, make_progress
from training.run_dir import CONFIG, METRICS, SKIPPED, save_model, write_json, write_splits
from training.splits import stratified_split


@dataclass
class Splits:
    train: DecodedImages
    val: DecodedImages
    test: DecodedImages | None
    skipped: list[dict]
    carved: list[str]


class AugmentedImages(Dataset):
    def __init__(self, data: DecodedImages, transform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.images[i]), self.data.labels[i]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_splits(source: DataSource, cfg: TrainConfig, policy: ResizePolicy, progress: ProgressBars | None) -> Splits:
    """Decode every split once; carve missing val/test splits from train, stratified and seeded."""
    skipped: list[dict] = []
    decoded = {}
    for name in ("train", "val", "test"):
        files = getattr(source, name)
        if files is not None:
            decoded[name], bad = decode_files(files, policy.resize_size, f"decoding {name}", progress)
            skipped += [{**b, "split": name} for b in bad]
    train = decoded["train"]
    _require_every_class(train, "train")
    carved = []
    if "test" not in decoded and cfg.test_fraction > 0:
        keep, held = stratified_split(train.labels.numpy(), cfg.test_fraction, cfg.seed)
        decoded["test"], train = train.subset(held), train.subset(keep)
        carved.append("test")
    if "val" not in decoded:
        # 70/15/15 of what is carved: val_fraction is of the original train, before test was taken out.
        frac = cfg.val_fraction / (1 - cfg.test_fraction) if "test" in carved else cfg.val_fraction
        keep, held = stratified_split(train.labels.numpy(), min(frac, 0.5), cfg.seed + 1)
        decoded["val"], train = train.subset(held), train.subset(keep)
        carved.append("val")
    _require_every_class(train, "train (after carving val/test)")
    if len(decoded["val"]) == 0:
        raise TrainingError("the validation split is empty; add images or give a val/ folder")
    return Splits(train, decoded["val"], decoded.get("test"), skipped, carved)


def _require_every_class(data: DecodedImages, where: str) -> None:
    counts = np.bincount(data.labels.numpy(), minlength=len(data.classes))
    empty = [c for c, n in zip(data.classes, counts) if n == 0]
    if empty:
        raise TrainingError(f"no usable {where} images for class(es) {', '.join(empty)}; add decodable images")


def _class_counts(data: DecodedImages | None) -> dict[str, int] | None:
    if data is None:
        return None
    counts = np.bincount(data.labels.numpy(), minlength=len(data.classes))
    return {c: int(n) for c, n in zip(data.classes, counts)}


def _make_loader(train: DecodedImages, cfg: TrainConfig, policy: ResizePolicy, device: torch.device) -> DataLoader:
    ds = AugmentedImages(train, augment.train_transform(cfg.augment, policy, cfg.hflip))
    world, rank = distributed.world_size(), distributed.rank()
    # The generator seeds loader workers: per rank, else every rank's workers draw the same augmentations.
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    sampler = None
    if cfg.balance == "sampler":
        counts = torch.bincount(train.labels, minlength=len(train.classes)).float()
        weights = (1.0 / counts)[train.labels]
        sampler = (WeightedRandomSampler(weights, num_samples=len(train), replacement=True, generator=gen) if world == 1
                   else distributed.DistributedWeightedSampler(weights, world, rank, cfg.seed))
    elif world > 1:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    per_rank = len(sampler) if sampler is not None else len(train)
    # Cached tensors make loading cheap; on CPU extra workers would only steal cores from the model.
    workers = 4 if device.type == "cuda" else 0
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, generator=gen,
                      num_workers=workers, pin_memory=device.type == "cuda", drop_last=per_rank > cfg.batch_size,
                      persistent_workers=workers > 0)


def _criterion(train: DecodedImages, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    weight = None
    if cfg.balance == "loss":
        counts = torch.bincount(train.labels, minlength=len(train.classes)).float()
        weight = (counts.sum() / (len(counts) * counts)).to(device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def score_split(model, data: DecodedImages, policy: ResizePolicy, device, cfg: TrainConfig) -> tuple[dict, np.ndarray, np.ndarray]:
    probs, embs = predict(model, augment.eval_crop(data.images, policy), device, cfg.batch_size * 2, cfg.channels_last, cfg.amp)
    return classification_scores(data.labels.numpy(), probs, data.classes), probs, embs


@dataclass
class FitResult:
    model: torch.nn.Module  # best weights restored, all stages open, eval mode
    history: list[dict]
    best_epoch: int
    replica_fingerprints: list[str] | None = None  # one per torchrun worker, all equal; None in one process


def fit_model(model, splits: Splits, cfg: TrainConfig, policy: ResizePolicy, device: torch.device,
              progress: ProgressBars, console: Console) -> FitResult:
    """The fine-tuning loop: unfreeze on schedule, train an epoch, score val, stop early, keep the best."""
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loader = _make_loader(splits.train, cfg, policy, device)
    criterion = _criterion(splits.train, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
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
        if stopper.should_stop:
            console.print(f"early stop after epoch {epoch + 1}: no {cfg.monitor} improvement for {cfg.patience} epochs")
            break
    eval_model.load_state_dict(best_state)
    eval_model.set_trainable(None)
    eval_model.eval()
    replicas = distributed.require_identical_replicas(eval_model) if world > 1 else None
    return FitResult(eval_model, history, stopper.best_epoch, replicas)


def write_run(out: Path, fit: FitResult, splits: Splits, cfg: TrainConfig, policy: ResizePolicy, device, info: dict,
              origin: dict, metrics: dict) -> dict:
    """Score the fitted model on val (and test), then write the run directory; returns `metrics` completed."""
    metrics["val"], _, _ = score_split(fit.model, splits.val, policy, device, cfg)
    if splits.test is not None and len(splits.test):
        metrics["test"], _, _ = score_split(fit.model, splits.test, policy, device, cfg)
    save_model(out, fit.model.cpu(), info)
    save_config(cfg, out / CONFIG)
    write_json(out / METRICS, metrics)
    write_json(out / SKIPPED, splits.skipped)
    write_splits(out, {k: getattr(splits, k) for k in ("train", "val", "test")}, origin, splits.carved)
    plot_curves(fit.history, out / "curves.png", fit.best_epoch)
    for name in ("val", "test"):
        if name in metrics:
            plot_confusion(metrics[name]["confusion_matrix"], info["classes"], out / f"confusion_{name}.png", f"{name} confusion")
    return metrics


def train(data: Path, out: Path, cfg: TrainConfig, test_dir: Path | None = None, overwrite: bool = False,
          console: Console | None = None, show_progress: bool = True) -> dict:
    """Fine-tune per `cfg` and write the run directory `out`. Returns the metrics dict.

    Under torchrun (see training.distributed) every worker trains and returns the same metrics;
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
    policy = ResizePolicy.for_crop(cfg.image_size or spec.default_crop)
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
            if splits.skipped:
                console.print(f"[yellow]warning:[/] skipped {len(splits.skipped)} undecodable image(s), listed in {out / SKIPPED}:")
                for s in splits.skipped[:10]:
                    console.print(f"  {s['path']}: {s['reason']}", highlight=False)
            counts = {"train": _class_counts(splits.train), "val": _class_counts(splits.val), "test": _class_counts(splits.test)}
            console.print(f"class counts: {counts}  (carved from train: {', '.join(splits.carved) or 'none'})", highlight=False)
            fit = fit_model(model, splits, cfg, policy, device, progress, console)
        if not launch.is_main:
            return distributed.broadcast_from_main(None)

        metrics = {"history": fit.history, "best_epoch": fit.best_epoch, "monitor": cfg.monitor, "class_counts": counts,
                   "carved_splits": splits.carved, "skipped_images": len(splits.skipped), "device": str(device)}
        if fit.replica_fingerprints:
            metrics["distributed"] = {"world_size": launch.world_size, "weights_sha256": fit.replica_fingerprints}
        info = {"backbone": spec.describe(), "weights": weights_desc, "classes": splits.train.classes, "policy": policy.as_dict(),
                "dropout": cfg.dropout, "embed_dim": int(fit.model.head.in_features), "best_epoch": fit.best_epoch}
        write_run(out, fit, splits, cfg, policy, device, info, source.origin, metrics)
        return distributed.broadcast_from_main(metrics)
