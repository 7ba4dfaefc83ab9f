"""Reading a YAML settings file, the same way for every room's settings object (each raises its own error)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml


def read_settings_file(path: Path, error: type[Exception], what: str, fix: str,
                       known: Iterable[str] | None = None) -> dict[str, Any]:
    """The mapping in `path`; `error(message)` when it is missing, not YAML, not a mapping, or has unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {fix}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of setting: value, got {type(data).__name__}")
    if known is not None:
        known = sorted(known)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise error(f"{what} {path} has unknown settings {unknown}; known: {known}")
    return data
