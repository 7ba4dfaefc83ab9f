"""Turn every TrainConfig field into a CLI flag, so the flags, YAML keys and env vars never drift apart."""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Optional

import typer

PANEL = "Training recipe (also settable in --config YAML or CNNLOOP_TRAIN_* env)"


def _flag_type(annotation: Any) -> tuple[type, str]:
    """(python type typer parses, choices hint) for a TrainConfig annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, "one of: " + ", ".join(map(str, typing.get_args(annotation)))
    if args and typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return _flag_type(args[0])
    return annotation, ""


def _config_parameters() -> list[inspect.Parameter]:
    from training.config import TrainConfig

    params = []
    for name, field in TrainConfig.model_fields.items():
        typ, choices = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if typ is bool else [flag]
        help_text = " ".join(x for x in (field.description or "", choices, f"(default: {field.default})") if x)
        option = typer.Option(None, *decls, help=help_text, show_default=False, rich_help_panel=PANEL)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[typ]))
    return params


def with_config_options(fn: Callable) -> Callable:
    """Add one flag per TrainConfig field to a typer command; they arrive in `overrides`."""
    from training.config import TrainConfig

    names = set(TrainConfig.model_fields)

    @functools.wraps(fn)
    def wrapper(**kwargs):
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return fn(overrides=overrides, **kwargs)

    sig = inspect.signature(fn)
    own = [p for n, p in sig.parameters.items() if n != "overrides"]
    wrapper.__signature__ = sig.replace(parameters=own + _config_parameters())
    return wrapper
