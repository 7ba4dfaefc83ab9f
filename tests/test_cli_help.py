"""Every subcommand's --help exits 0, explains every flag, and shows flags as flags."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from training.cli import app


# typer builds on its own copy of click, so commands, groups and params are told apart by duck type.
def _commands(group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    found = [(path, group)]
    if hasattr(group, "commands"):
        for name, sub in sorted(group.commands.items()):
            found += _commands(sub, path + (name,))
    return found


COMMANDS = _commands(typer.main.get_command(app))
LEAVES = [(path, cmd) for path, cmd in COMMANDS if not hasattr(cmd, "commands")]


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "220", "TERMINAL_WIDTH": "220"})
    assert result.exit_code == 0, result.output
    return result.output


def test_the_cli_has_the_documented_subcommands():
    names = {" ".join(path) for path, _ in LEAVES}
    assert {"data digits", "train", "cv", "compare", "evaluate", "export", "registry list", "registry show", "registry promote",
            "registry rollback", "serve", "drift", "retrain", "demo", "lr-find"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "cnnloop")
def test_help_exits_zero_and_names_what_the_command_does(path):
    text = _help(path)
    assert "Usage:" in text and len(text.split()) > 10


@pytest.mark.parametrize("path,command", LEAVES, ids=lambda p: " ".join(p) if isinstance(p, tuple) else "")
def test_every_flag_is_documented_in_help(path, command):
    text = _help(path)
    for param in command.params:
        if param.param_type_name == "option":
            assert (param.help or "").strip(), f"`cnnloop {' '.join(path)} {param.opts[0]}` has no help text"
            for opt in param.opts:
                assert opt in text, f"{opt} missing from `cnnloop {' '.join(path)} --help`"
        elif param.param_type_name == "argument":
            assert (getattr(param, "help", "") or "").strip(), f"argument {param.name} of `{' '.join(path)}` has no help"


@pytest.mark.parametrize("path,command", LEAVES, ids=lambda p: " ".join(p) if isinstance(p, tuple) else "")
def test_boolean_options_are_flags_that_take_no_value(path, command):
    for param in command.params:
        if param.param_type_name == "option" and param.type.name == "boolean":
            assert param.is_flag, f"`cnnloop {' '.join(path)} {param.opts[0]}` would take a value"
    text = _help(path)
    # A value type printed beside a flag (`--quiet <bool>`) reads as if the flag took a value.
    assert "<bool>" not in text and "BOOLEAN" not in text, text
