"""Progress bars draw for every task any command adds (the crash that `--quiet` tests hid)."""
from __future__ import annotations

import io
import re

from rich.console import Console
from rich.progress import TextColumn

from training.progress import TASK_FIELDS, make_progress


def test_every_field_a_column_renders_is_given_to_every_task():
    progress = make_progress(Console(file=io.StringIO()), enabled=True)
    rendered = {name for column in progress.columns if isinstance(column, TextColumn)
                for name in re.findall(r"task\.fields\[['\"]?(\w+)['\"]?\]", column.text_format)}
    assert rendered and rendered <= set(TASK_FIELDS)


def test_a_task_added_with_no_fields_draws_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with make_progress(console, enabled=True) as progress:
        task = progress.add_task("decoding train", total=4)  # as the image decoder adds its task
        progress.advance(task, 4)
        progress.refresh()
    assert "decoding train" in out.getvalue() and "4/4" in out.getvalue()
