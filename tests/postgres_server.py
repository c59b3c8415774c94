"""A throwaway PostgreSQL server for tests: initdb in a temp dir, pg_ctl on a free port."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from helpers import free_port

# initdb refuses to run as root; as root the server runs as this (Debian's) user instead.
SERVER_USER = "postgres"


def _children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl live: on PATH, or Debian's versioned directory."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """Trust auth on 127.0.0.1 only; every test database is created fresh by `new_database`."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: run `make deps`")
        self.bindir = bindir
        # Not under pytest's tmp dir: that is private to the user running the tests.
        self.root = Path(tempfile.mkdtemp(prefix="slm-postgres-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", SERVER_USER, "--"]
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as_user, *args], check=True, capture_output=True, cwd=self.root, timeout=120
        )

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SERVER_USER,
            "--auth=trust", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        # -w waits until the server accepts connections: no polling in the tests.
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash of the server's host would (a
        backend left running would hold the shared memory a new postmaster needs)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        victims = [pid, *_children_of(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        for victim in victims:
            while _state(victim) not in ("X", "Z"):
                time.sleep(0.01)
        # Dead, but a zombie until its parent reaps it, and PID 1 of these VMs does not: the
        # lock files would still name a "running" postmaster. They are stale; remove them.
        (self.data / "postmaster.pid").unlink()
        for lock in self.root.glob(".s.PGSQL.*.lock"):
            lock.unlink()

    def restart(self) -> None:
        """Start the killed server again (crash recovery replays its WAL)."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        # Immediate: the data directory is thrown away, so the shutdown checkpoint is wasted.
        try:
            self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )  # fmt: skip
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """A new empty database; its DSN."""
        import asyncpg

        name = f"ledger_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(self.dsn())
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return self.dsn(name)
