"""The README's shell commands, read from README.md itself, so CI and the tests run what a user reads.

A block the README marks with `<!-- readme-command: NAME -->` on the line before its ```bash fence
is a named command: `main` (set up and run the demo) and `tests`; a marked ```python block is a
snippet the tests run as printed (`tritonclient`). `.ci/run` runs them as printed:

    python3 tests/readme_blocks.py main      # prints the command

Standard library only: CI reads the main command before the virtualenv it creates exists.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_MARKER = re.compile(r"^<!--\s*readme-command:\s*([\w-]+)\s*-->\s*$")


def _fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(line index of the opening fence, info string, body lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        body, j = [], i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            body.append(lines[j])
            j += 1
        blocks.append((i, opening.group(1), body))
        i = j + 1
    return blocks


def named_command(name: str, readme: Path = README) -> str:
    """The one-line command of the bash block marked `readme-command: NAME`."""
    lines = readme.read_text().splitlines()
    for start, info, body in _fenced_blocks(readme.read_text()):
        marker = _MARKER.match(lines[start - 1]) if start > 0 else None
        if marker and marker.group(1) == name:
            commands = [line for line in body if line.strip() and not line.lstrip().startswith("#")]
            if info != "bash" or len(commands) != 1:
                raise ValueError(f"README block '{name}' must be a ```bash block of exactly one command line")
            return commands[0].strip()
    raise KeyError(f"README.md has no block marked <!-- readme-command: {name} -->")


def named_python(name: str, readme: Path = README) -> str:
    """The code of the ```python block marked `readme-command: NAME` (a snippet the tests run as printed)."""
    lines = readme.read_text().splitlines()
    for start, info, body in _fenced_blocks(readme.read_text()):
        marker = _MARKER.match(lines[start - 1]) if start > 0 else None
        if marker and marker.group(1) == name:
            if info != "python":
                raise ValueError(f"README block '{name}' must be a ```python block")
            return "\n".join(body) + "\n"
    raise KeyError(f"README.md has no block marked <!-- readme-command: {name} -->")


def normal(line: str) -> str:
    """A command line with its comment dropped and white space folded: how lines are compared."""
    return " ".join(shlex.split(line, comments=True))


def bash_lines(readme: Path = README) -> dict[str, str]:
    """Every command line of every ```bash block: {normal form: the line as printed}."""
    out = {}
    for _, info, body in _fenced_blocks(readme.read_text()):
        if info != "bash":
            continue
        for line in body:
            if normal(line):
                out[normal(line)] = line.strip()
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/readme_blocks.py NAME   (main | tests)")
    print(named_command(sys.argv[1]))
