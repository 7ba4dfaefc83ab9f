"""The train/val/test splits a fit needs, decoded once: given ones as they are, missing ones carved
from train (stratified, seeded). The test split is only ever scored, never trained or stopped on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporters.preprocess import ResizePolicy
from training.config import TrainConfig
from training.data.sources import DataSource
from training.errors import TrainingError
from training.data.decode import DecodedImages, decode_files
from training.progress import ProgressBars
from training.data.stratify import stratified_split


@dataclass
class Splits:
    train: DecodedImages
    val: DecodedImages
    test: DecodedImages | None
    skipped: list[dict]
    carved: list[str]


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


def class_counts(data: DecodedImages | None) -> dict[str, int] | None:
    if data is None:
        return None
    counts = np.bincount(data.labels.numpy(), minlength=len(data.classes))
    return {c: int(n) for c, n in zip(data.classes, counts)}


def class_counts_by_split(splits: Splits) -> dict[str, dict[str, int] | None]:
    return {name: class_counts(getattr(splits, name)) for name in ("train", "val", "test")}
