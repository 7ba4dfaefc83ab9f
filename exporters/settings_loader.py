"""Loading a settings object the same way in every room: defaults < YAML file < env < overrides.

Each room passes its own exception type and settings class; every message has one shape, so a
bad value reads the same from `cnnloop train`, `cnnloop retrain` and the service: the field, what
is wrong, the value got (tokens masked) and the environment variable that sets it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource

Settings = TypeVar("Settings", bound=BaseSettings)

MASK = "***"
FILE_FIX = "pass an existing YAML file to --config"


def read_settings_file(path: Path, error: type[Exception], what: str, fix: str) -> dict[str, Any]:
    """The mapping in `path`; `error(message)` when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {fix}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of setting: value, got {type(data).__name__}")
    return data


def env_var(env_prefix: str, field: str) -> str:
    return f"{env_prefix}{field.upper()}"


def describe_errors(errors: Iterable[Mapping[str, Any]], env_prefix: str, known: Iterable[str]) -> str:
    """One line for pydantic's errors: field, message, value got and env var; unknown keys with the known ones."""
    parts, unknown = [], False
    for err in errors:
        loc = [str(p) for p in err.get("loc") or ()]
        message = str(err.get("msg", "")).removeprefix("Value error, ")
        if not loc:  # a check across fields: its message names them
            parts.append(message)
        elif err.get("type") == "extra_forbidden":
            unknown = True
            parts.append(f"unknown setting '{'.'.join(loc)}'")
        else:
            field = ".".join(loc)
            # Tokens and database URLs (user:password@) are never echoed; the validator's message says what is wrong.
            got = MASK if "token" in field.lower() or field.endswith("_url") and "@" in str(err.get("input")) else repr(err.get("input"))
            parts.append(f"'{field}': {message} (got {got}, env {env_var(env_prefix, loc[0])})")
    if unknown:
        parts.append("known settings: " + ", ".join(sorted(known)))
    return "; ".join(parts)


def load_settings(cls: type[Settings], error: type[Exception], what: str, config_file: Path | None = None,
                  overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                  file_fix: str = FILE_FIX) -> Settings:
    """`cls` from defaults < YAML `config_file` < env (cls's env_prefix; `environ` or os.environ) < `overrides`.

    An override of None means "not given". Any problem raises `error("invalid {what}...: ...")`."""
    prefix = cls.model_config.get("env_prefix", "")
    known = cls.model_fields
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(read_settings_file(config_file, error, f"{what} file", file_fix))
        # Settings that ignore extra keys (one ConfigMap feeds several rooms) would drop a typo silently.
        unknown = [{"type": "extra_forbidden", "loc": (k,)} for k in sorted(set(merged) - set(known))]
        if unknown:
            raise error(f"invalid {what} in {config_file}: {describe_errors(unknown, prefix, known)}")
    try:
        env = EnvSettingsSource(cls)
        # pydantic-settings matches names case-insensitively by lowering the environment's keys.
        env.env_vars = {k.lower(): v for k, v in (os.environ if environ is None else environ).items()}
        merged.update(env())
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**merged)
    except ValidationError as e:
        raise error(f"invalid {what}: {describe_errors(e.errors(), prefix, known)}") from None
