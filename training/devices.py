"""Which torch device a command runs on: one type for every setting that names one, and its resolution.

`Device` checks the spelling when settings load (no torch needed); `resolve_device` checks that the
machine has it. Commands call `resolve_device` before any work, so `--device cuda:1` on a machine
with one GPU fails in a second, not after the data is decoded or the retrain lock is taken.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator

from training.errors import TrainingError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N (N: a GPU index)"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"must be {DEVICE_CHOICES}")
    return name


Device = Annotated[str, AfterValidator(check_device_name)]


def resolve_device(requested: str) -> "torch.device":
    """The torch device for auto | cpu | cuda | cuda:N; TrainingError when the machine lacks it."""
    import torch

    try:
        name = check_device_name(requested)
    except ValueError as e:
        raise TrainingError(f"device '{requested}': {e}") from None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return torch.device("cuda" if visible else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if visible == 0:
        raise TrainingError(f"device '{name}' was asked for but no CUDA GPU is visible; use --device auto or cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= visible:
        raise TrainingError(f"device '{name}' was asked for but {visible} CUDA GPU(s) are visible "
                            f"(cuda:0..cuda:{visible - 1}); use one of those, cuda, or auto")
    return torch.device(name)
