"""Flags `cnnloop drift` and `cnnloop retrain` share (the store flags are in common.py), and the time parsing behind --since / --every."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

CONFIG = typer.Option(None, "--config", help="YAML file of drift/retrain settings (see `LoopSettings`); env CNNLOOP_* overrides it.")


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '2d' -> seconds."""
    m = _DURATION.match(text or "")
    if not m:
        raise typer.BadParameter(f"'{text}' is not a duration; use a number with s, m, h or d (e.g. 30m, 1h)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_since(text: str, now: float) -> float:
    """A duration ago ('2h') or an ISO-8601 time ('2026-11-24T10:00', UTC unless it says otherwise) -> epoch seconds."""
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is neither a duration (2h, 30m) nor an ISO time (2026-11-24T10:00)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def loop_settings(config: Path | None, registry: str | None, data_dir: str | None, s3_endpoint_url: str | None,
                  log_url: str | None = None, **more: Any):
    """LoopSettings from --config < CNNLOOP_* env < these flags (None = not given)."""
    from training.retrain.settings import load_loop_settings

    return load_loop_settings(config, {"registry": registry, "data_dir": data_dir, "s3_endpoint_url": s3_endpoint_url,
                                       "log_url": log_url, **more})
