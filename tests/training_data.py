"""Small real and synthetic image sets for the training tests (no network, seconds to build)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.config import TrainConfig, load_train_config
from training.data.digits import write_digits

# A recipe small enough for a CPU unit test: 64 px inputs, a few epochs, no flips (digits).
FAST = dict(image_size=64, epochs=3, batch_size=16, hflip=False, num_threads=2, patience=10)


def fast_config(**overrides) -> TrainConfig:
    return load_train_config(None, {**FAST, **overrides})


def make_digits(root: Path, digits=(0, 1, 2), per_class: int = 20) -> Path:
    write_digits(root, size=32, limit_per_class=per_class, digits=list(digits))
    return root


def write_png(path: Path, rgb=(128, 128, 128), size: int = 24, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path
