"""Train/eval presets on cached uint8 squares (torchvision v2 on tensors, no PIL round trip)."""
from __future__ import annotations

from functools import partial

import torch
from torchvision.transforms import v2

from exporters.preprocess import ResizePolicy, center_crop_window

PRESETS = ("none", "light", "strong")


def train_transform(preset: str, policy: ResizePolicy, hflip: bool = True) -> v2.Transform:
    """Random crop-zoom, flips, rotation and colour on one 3xSxS uint8 image -> 3xCxC uint8."""
    c = policy.crop_size
    if preset == "none":
        # Not v2.CenterCrop: its rounding puts the crop a pixel off eval_crop for some sizes.
        # partial, not a lambda: the DataLoader's workers must be able to pickle it.
        return v2.Lambda(partial(eval_crop, policy=policy))
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    if preset == "light":
        return v2.Compose([v2.RandomResizedCrop(c, scale=(0.5, 1.0), antialias=True), *flip])
    if preset == "strong":
        return v2.Compose([
            v2.RandomRotation(15),
            v2.RandomResizedCrop(c, scale=(0.3, 1.0), antialias=True),
            *flip,
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
        ])
    raise ValueError(f"unknown augmentation preset {preset!r}; use one of {', '.join(PRESETS)}")


def noise_std(preset: str) -> float:
    """Gaussian pixel noise (on [0, 1] floats) added on the device; only the strong preset uses it."""
    return 0.03 if preset == "strong" else 0.0


def eval_crop(images: torch.Tensor, policy: ResizePolicy) -> torch.Tensor:
    """Centre crop of cached ...xSxS squares: the window `exporters.preprocess.center_crop` serves."""
    rows, cols = center_crop_window(images.shape[-2], images.shape[-1], policy.crop_size)
    return images[..., rows, cols]
