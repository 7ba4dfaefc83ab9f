"""scikit-learn's real handwritten digits (1,797 8x8 scans) as an ImageFolder: data every machine has."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.errors import TrainingError


def write_digits(out: Path, size: int = 32, limit_per_class: int | None = None, overwrite: bool = False,
                 digits: list[int] | None = None) -> dict[str, int]:
    """Write out/<digit>/<index>.png, upscaled from 8x8 to size x size; returns images per class."""
    from sklearn.datasets import load_digits

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TrainingError(f"{out} is not empty; choose an empty --out or pass --overwrite")
    if not 8 <= size <= 512:
        raise TrainingError(f"--size must be between 8 and 512, got {size}")
    data = load_digits()
    counts: dict[str, int] = {}
    for i, (img, label) in enumerate(zip(data.images, data.target)):
        if digits is not None and int(label) not in digits:
            continue
        name = str(int(label))
        if limit_per_class is not None and counts.get(name, 0) >= limit_per_class:
            continue
        # Values are 0..16 ink; invert so digits are dark on light, like scanned paper.
        pixels = (255 - np.asarray(img) * (255 / 16)).clip(0, 255).astype(np.uint8)
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).save(d / f"{i:04d}.png")
        counts[name] = counts.get(name, 0) + 1
    return counts
