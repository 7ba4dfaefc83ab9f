"""The search space of `cnnloop tune`: which recipe keys are searched, over what, and which are fixed.

A space maps TrainConfig keys to one of
  {low: 1e-4, high: 1e-2, log: true}   a float range (an int range when the key is an int, or with step)
  {choices: [freeze, gradual]}         a categorical
  0.2                                  a fixed value (not searched)
`--space FILE` (YAML) is laid over the default space key by key. Every key and every bound is checked
against TrainConfig before any trial runs, so a typo fails in a second, not after an hour of trials.
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from training.config import TrainConfig
from training.errors import TrainingError

# Small data on a CPU: ranges wide enough to hold every recipe that scored well in BENCHMARKS.md,
# narrow enough that 20-50 trials learn something.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "backbone_lr_ratio": {"low": 0.01, "high": 1.0, "log": True},
    "weight_decay": {"low": 1e-5, "high": 0.1, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "strategy": {"choices": ["freeze", "gradual", "finetune"]},
    "head_epochs": {"low": 0, "high": 3},
    "augment": {"choices": ["none", "light", "strong"]},
    "image_size": {"choices": [160, 224, 288]},
    "optimizer": {"choices": ["adamw", "sgd"]},
    "batch_size": {"choices": [16, 32]},
    "backbone": {"choices": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]},
}
_RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float", "int", "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return value is not None and self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


@dataclass(frozen=True)
class SearchSpace:
    params: dict[str, Param]
    fixed: dict[str, Any]

    def sample(self, trial) -> dict[str, Any]:
        return {name: p.suggest(trial) for name, p in self.params.items()}


def _is_int_field(name: str) -> bool:
    annotation = TrainConfig.model_fields[name].annotation  # int, or int | None
    return int in (typing.get_args(annotation) or (annotation,))


def _check_value(name: str, value: Any, base: TrainConfig, where: str) -> None:
    try:
        TrainConfig.model_validate({**base.model_dump(), name: value})
    except ValidationError as e:
        msg = "; ".join(err["msg"] for err in e.errors())
        raise TrainingError(f"{where}: {name}={value!r} is not a valid value: {msg}") from None


def _parse(name: str, spec: Any, base: TrainConfig, where: str) -> Param | Any:
    if not isinstance(spec, dict):
        _check_value(name, spec, base, where)
        return spec  # fixed
    keys = set(spec)
    if keys == {"choices"}:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise TrainingError(f"{where}: {name}.choices must be a non-empty list, got {choices!r}")
        for c in choices:
            _check_value(name, c, base, where)
        return Param(name, "categorical", choices=tuple(choices))
    unknown = keys - _RANGE_KEYS
    if unknown or not {"low", "high"} <= keys:
        raise TrainingError(f"{where}: {name} must be a value, {{choices: [...]}} or {{low: L, high: H[, log: true][, step: S]}}; "
                            f"got keys {sorted(keys)}")
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise TrainingError(f"{where}: {name} bounds must be numbers, got low={low!r} high={high!r}")
    if not low < high:
        raise TrainingError(f"{where}: {name} needs low < high, got low={low} high={high}")
    if log and low <= 0:
        raise TrainingError(f"{where}: {name} has log: true, which needs low > 0 (got {low})")
    if log and step is not None:
        raise TrainingError(f"{where}: {name} cannot have both log: true and step")
    is_int = _is_int_field(name)
    if is_int and not (float(low).is_integer() and float(high).is_integer()):
        raise TrainingError(f"{where}: {name} is an integer setting; give integer bounds (got {low}, {high})")
    for bound in (low, high):
        _check_value(name, int(bound) if is_int else float(bound), base, where)
    return Param(name, "int" if is_int else "float", float(low), float(high), log, step)


def load_space(path: Path | None, base: TrainConfig, fixed_by_user: set[str] = frozenset()) -> SearchSpace:
    """The default space, minus keys the user fixed by flag or --config, with `path`'s YAML laid over it."""
    layered: dict[str, Any] = {k: v for k, v in DEFAULT_SPACE.items() if k not in fixed_by_user}
    where = "default search space"
    if path is not None:
        where = f"--space {path}"
        try:
            given = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise TrainingError(f"--space file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise TrainingError(f"--space file {path} is not valid YAML: {e}") from None
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise TrainingError(f"--space file {path} must be a YAML mapping of recipe keys, got {type(given).__name__}")
        for key in given:
            if key not in TrainConfig.model_fields:
                near = difflib.get_close_matches(str(key), TrainConfig.model_fields, n=1)
                raise TrainingError(f"--space {path}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                    "; keys are the training config's (cnnloop train --help)"))
        layered.update(given)
    params, fixed = {}, {}
    for name, spec in layered.items():
        parsed = _parse(name, spec, base, where)
        (params if isinstance(parsed, Param) else fixed)[name] = parsed
    if not params:
        raise TrainingError(f"{where}: every key is fixed, so there is nothing to search; give at least one range or choices")
    return SearchSpace(params, fixed)


def check_backbones(space: SearchSpace, base: TrainConfig) -> None:
    """Every backbone a trial may draw has weights at hand, or the search fails now rather than mid-study."""
    from training.model.backbones import check_weights_at_hand, get_backbone_spec

    names = space.params["backbone"].choices if "backbone" in space.params else (space.fixed.get("backbone", base.backbone),)
    if base.weights != "default" and len(names) > 1:
        raise TrainingError(f"weights {base.weights!r} fit one backbone, but the space searches {list(names)}; "
                            "fix `backbone` in --space or leave --weights at 'default'")
    for name in names:
        # Unknown names fail in get_backbone_spec, with close matches.
        check_weights_at_hand(get_backbone_spec(name), base.weights, "drop it from the space's backbone choices, "
                              "or fix backbone and give --weights FILE")
