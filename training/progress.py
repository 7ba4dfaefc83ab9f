"""The one way every command draws progress bars.

Its columns render a task's `info` field, so `add_task` always gives a task one: a task added
without it (the decode step once was) crashed every command the moment the bar drew, while every
`--quiet` test passed. Nothing else in the project builds a rich `Progress`.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

# Every field a column below reads from task.fields, with the value a new task starts with.
TASK_FIELDS: dict[str, Any] = {"info": ""}


class ProgressBars(Progress):
    """rich's Progress whose tasks carry every field its columns render."""

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        return super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                **{**TASK_FIELDS, **fields})


def make_progress(console: Console, enabled: bool) -> ProgressBars:
    """Bars on `console` (stderr for the CLI); `enabled=False` draws nothing (--quiet, torchrun ranks > 0)."""
    return ProgressBars(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
    )
