"""Decode every image once into a uint8 tensor, so later epochs never touch a JPEG again."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporters.preprocess import ImageDecodeError, decode_resized_square
from training.data.sources import LabeledFiles
from training.progress import ProgressBars


@dataclass
class DecodedImages:
    images: torch.Tensor  # uint8 N x 3 x S x S, the resize_size square of each image
    labels: torch.Tensor  # int64 N
    paths: list[Path]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "DecodedImages":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return DecodedImages(self.images[idx], self.labels[idx], [self.paths[i] for i in idx.tolist()], self.classes)


def _decode_one(path: Path, size: int) -> np.ndarray | str:
    try:
        return decode_resized_square(path, size)
    except (ImageDecodeError, OSError) as e:
        return str(e)


def decode_files(files: LabeledFiles, size: int, label: str = "decoding",
                 progress: ProgressBars | None = None) -> tuple[DecodedImages, list[dict]]:
    """Decode `files` to size x size squares. Undecodable files are skipped and returned as
    [{"path", "reason"}] so the caller can warn and record them."""
    # PIL releases the GIL while decoding and resizing: threads scale across cores.
    workers = min(8, os.cpu_count() or 1)
    arrays, keep, skipped = [], [], []
    task = progress.add_task(label, total=len(files)) if progress else None
    with ThreadPoolExecutor(workers) as pool:
        for i, out in enumerate(pool.map(lambda p: _decode_one(p, size), files.paths)):
            if isinstance(out, str):
                skipped.append({"path": str(files.paths[i]), "reason": out})
            else:
                arrays.append(out)
                keep.append(i)
            if progress is not None:
                progress.advance(task)
    if arrays:
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    else:
        images = torch.empty((0, 3, size, size), dtype=torch.uint8)
    labels = torch.as_tensor(files.labels[keep], dtype=torch.long)
    return DecodedImages(images, labels, [files.paths[i] for i in keep], files.classes), skipped
