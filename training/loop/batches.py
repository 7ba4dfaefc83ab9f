"""What an epoch feeds the model: augmented batches of the cached squares, and the loss.

Class imbalance is handled in one of the two, per `cfg.balance`: the sampler draws each class
equally often ("sampler"), or the loss weighs each class by its inverse frequency ("loss").
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from exporters.preprocess import ResizePolicy
from training.data import augment
from training.loop import distributed
from training.config import TrainConfig
from training.data.decode import DecodedImages


class AugmentedImages(Dataset):
    def __init__(self, data: DecodedImages, transform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.images[i]), self.data.labels[i]


def make_train_loader(train: DecodedImages, cfg: TrainConfig, policy: ResizePolicy, device: torch.device) -> DataLoader:
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


def make_criterion(train: DecodedImages, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Cross-entropy; with balance="loss" class k weighs N / (K * count_k), so every class adds up equally."""
    weight = None
    if cfg.balance == "loss":
        counts = torch.bincount(train.labels, minlength=len(train.classes)).float()
        weight = (counts.sum() / (len(counts) * counts)).to(device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
