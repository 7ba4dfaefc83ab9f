"""The classifier that gets trained and exported: normalise -> backbone stages -> pool -> dropout -> head.

Normalisation lives inside the module, so training, export and serving cannot disagree on it.
Input: float images in [0, 1], NCHW.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from training.model.backbones import BackboneSpec, load_pretrained_network


class Classifier(nn.Module):
    def __init__(self, stages: list[nn.Module], pool: nn.Module | None, embed_dim: int, num_classes: int,
                 mean: tuple, std: tuple, dropout: float = 0.0):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = pool if pool is not None else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # Bottom stages that run without autograd: frozen stages cost a forward pass only.
        self.frozen_stages = 0
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        k = self.frozen_stages
        if k:
            with torch.no_grad():
                for stage in self.stages[:k]:
                    x = stage(x)
        for stage in self.stages[k:]:
            x = stage(x)
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    def set_trainable(self, open_stages: int | None) -> None:
        """Head always trains; the top `open_stages` backbone stages too (None = all, 0 = none)."""
        n = len(self.stages)
        open_stages = n if open_stages is None else max(0, min(n, open_stages))
        self.frozen_stages = n - open_stages
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= self.frozen_stages)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.stages for p in s.parameters()] + list(self.pool.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


def build_classifier(spec: BackboneSpec, num_classes: int, weights: str = "default", dropout: float = 0.0,
                     cache_dir: Path | None = None) -> tuple[Classifier, str]:
    net, weights_desc = load_pretrained_network(spec, weights, cache_dir)
    model = Classifier(
        stages=spec.stages(net),
        pool=spec.pool(net) if spec.pool else None,
        embed_dim=spec.embed_dim(net),
        num_classes=num_classes,
        mean=spec.mean,
        std=spec.std,
        dropout=dropout,
    )
    return model, weights_desc


def set_batchnorm_eval(model: Classifier, all_bn: bool) -> None:
    """Keep BatchNorm running stats fixed: in frozen stages always, everywhere when `all_bn`.

    Small fine-tuning sets give noisy batch statistics; the pretrained ones are steadier."""
    for i, stage in enumerate(model.stages):
        if all_bn or i < model.frozen_stages:
            for m in stage.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
