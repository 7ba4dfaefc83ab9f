"""Run a shell command line in a pseudo-terminal, as a person's terminal runs it.

rich draws live progress bars only when its stream is a terminal, so a command that crashes only
while its bars draw passes every test that pipes its output. These helpers give the child a real
pty (120 x 40) on stdin, stdout and stderr, collect what it drew, and bound every wait.
"""
from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def plain(text: str) -> str:
    """`text` without terminal control sequences and carriage returns."""
    return _ANSI.sub("", text)


def ctrl_c_live() -> None:
    """preexec_fn: the child starts with Ctrl-C live, as a terminal's command does. A test run launched
    in the background (`nohup pytest &`) ignores SIGINT, and children inherit that: Ctrl-C tests hung."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """One command line running under `bash -c` in its own pty and process group."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], columns: int = 120, rows: int = 40):
        self.command = command
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=slave, stdout=slave,
                                        stderr=slave, start_new_session=True, close_fds=True, preexec_fn=ctrl_c_live)
        os.close(slave)
        self._master, self._chunks = master, []

    @property
    def output(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def _read(self, timeout: float) -> bool:
        """Read what is there within `timeout`; False once the terminal is closed."""
        if self._master is None:
            return False
        ready, _, _ = select.select([self._master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: every process holding the pty's other side has exited
            data = b""
        if not data:
            os.close(self._master)
            self._master = None
            return False
        self._chunks.append(data)
        return True

    def read_until(self, pattern: str, timeout: float) -> str:
        """Wait until the plain output matches `pattern`; the output so far in the error otherwise."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, plain(self.output)):
            if time.monotonic() > deadline or not self._read(0.5):
                if re.search(pattern, plain(self.output)):
                    break
                raise AssertionError(f"`{self.command}` did not print /{pattern}/ within {timeout:.0f}s; "
                                     f"it printed:\n{plain(self.output)[-4000:]}")
        return plain(self.output)

    def wait(self, timeout: float) -> tuple[int, str]:
        """(exit code, plain output) once the command ends; killed and failed past `timeout`."""
        deadline = time.monotonic() + timeout
        while self._read(0.5):
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"`{self.command}` still ran after {timeout:.0f}s; it printed:\n"
                                     f"{plain(self.output)[-4000:]}")
        try:
            code = self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"`{self.command}` closed its terminal but did not exit") from None
        return code, plain(self.output)

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the command's process group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self._master is not None:
            os.close(self._master)
            self._master = None


def run_in_terminal(command: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run `command` to its end in a pty: (exit code, plain output)."""
    term = Terminal(command, cwd, env)
    try:
        return term.wait(timeout)
    finally:
        term.kill()
