"""A real PostgreSQL server for tests: initdb into a temporary directory, pg_ctl start on a free loopback port.

One server per test session (initdb + start cost ~2 s); every test gets its own fresh, empty database, so
tests never see each other's rows. Trust authentication on 127.0.0.1 only: the server lives as long as the
session and its directory is removed afterwards, even when a test or the start itself fails."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.s3_server import free_port

USER = "cnnloop"
# The server refuses to run as root; as root (CI containers) it runs as Debian's `postgres` user.
SYSTEM_USER = "postgres"


def postgres_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: PATH, else the newest /usr/lib/postgresql/*/bin, else dpkg's list."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                       key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
    if installed:
        return Path(installed[-1]).parent
    if shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "postgresql-15"], capture_output=True, text=True, timeout=30).stdout
        found = [line for line in listed.splitlines() if line.endswith("bin/initdb")]
        if found:
            return Path(found[0]).parent
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` "
                "(apt-get install postgresql; .ci/run does). These tests fail instead of skipping so a "
                "missing tool is never green.")


class PostgresServer:
    """A throwaway PostgreSQL cluster: `with PostgresServer() as pg: pg.create_database()`."""

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        self.root: Path | None = None
        self.port: int | None = None
        self._as_system_user = os.geteuid() == 0

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        assert self.port is not None, "the server is not started"
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database (a random name unless given); returns its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def start(self) -> PostgresServer:
        self.root = Path(tempfile.mkdtemp(prefix="cnnloop-pg-"))
        try:
            if self._as_system_user:
                shutil.chown(self.root, user=SYSTEM_USER)
            self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", USER, "--no-sync",
                      "--no-instructions", "-E", "UTF8", timeout=120)
            self.port = free_port()
            options = (f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c max_connections=200")
            proc = self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-w", "-t", "60",
                             "-l", str(self.data_dir / "log"), "start", timeout=90, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"PostgreSQL did not start (pg_ctl exit {proc.returncode}): {proc.stderr.strip()}\n"
                                   f"server log tail:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (immediately: nothing here needs to survive) and remove its directory."""
        if self.root is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", timeout=60, check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            self.port = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, tool: str, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / tool), *args]
        if self._as_system_user:
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
        return proc

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.data_dir / "log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no server log: {e})"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
