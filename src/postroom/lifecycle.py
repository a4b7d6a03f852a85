"""One lifecycle for postroom's services (the relay and the consumer).

:class:`Lifecycle` starts a service's work with its background loops and its /metrics,
/healthz and /readyz endpoint, stops it on request, and shuts it down in one order:
drain the work in hand, cancel the background loops, close the connections, close the
endpoint. :func:`purge_round` is the one bounded retention purge, :func:`repeat` the one
periodic loop, and :func:`run_until_signalled` runs a service until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry

from postroom.log import get_logger
from postroom.metrics import DEFAULT_METRICS_HOST, serve_http

#: Rows deleted per statement, and statements per round, by a retention purge.
PURGE_BATCH: Final = 5000
PURGE_BATCHES_PER_ROUND: Final = 20
#: Seconds between retention rounds.
PURGE_INTERVAL: Final = 60.0

Background = tuple[str, Callable[[], Coroutine[Any, Any, None]]]
"""A background loop: its task name and the coroutine function that runs it."""


class Service(Protocol):
    """What :func:`run_until_signalled` needs of a service."""

    def stop(self) -> None:
        """Ask the service to finish and return from :meth:`run`."""

    async def run(self) -> None:
        """Run until :meth:`stop` is called."""


class Lifecycle:
    """Start, readiness and health, stop and the metrics endpoint of one service.

    ``component`` names the log events (``<component>.starting``, ``.stopping``,
    ``.stopped``, ``.background_task_failed``); ``identity`` fields go with each of them.
    ``on_stop`` runs on every stop request (e.g. to wake a loop that waits elsewhere).
    """

    def __init__(
        self,
        component: str,
        registry: CollectorRegistry,
        *,
        metrics_port: int,
        metrics_host: str = DEFAULT_METRICS_HOST,
        health_timeout: float = 120.0,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        identity: dict[str, Any],
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.component = component
        self.registry = registry
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.health_timeout = health_timeout
        self.healthy = healthy
        self.ready = ready
        self.identity = identity
        self._on_stop = on_stop
        self.stopping = asyncio.Event()
        """Set once :meth:`stop` was called (or a background loop failed)."""
        self.failure: BaseException | None = None
        """The error of a background loop that ended, raised by :meth:`run` at the end."""
        self._log = get_logger(component)
        self.created = time.monotonic()
        self._last_progress = self.created

    def progressed(self) -> None:
        """Note that the work loop went round (what :meth:`quiet_for` measures)."""
        self._last_progress = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since the work loop last went round (or since the service was made)."""
        return time.monotonic() - self._last_progress

    def turning(self) -> bool:
        """True while the work loop went round within ``health_timeout`` seconds.

        A service's loop marks :meth:`progressed` on every round, also when a round brings
        no work, so a quiet service stays healthy and only a stuck loop turns unhealthy.
        """
        return self.quiet_for() < self.health_timeout

    def stop(self) -> None:
        """Ask the service to stop (logged once)."""
        if not self.stopping.is_set():
            self._log.info(f"{self.component}.stopping", **self.identity)
        self.stopping.set()
        if self._on_stop is not None:
            self._on_stop()

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the service stops first; False if it is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        return not self.stopping.is_set()

    async def run(
        self,
        work: Callable[[], Awaitable[None]],
        *,
        background: Sequence[Background] = (),
        drain: Callable[[], Awaitable[None]] | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
        starting: dict[str, Any] | None = None,
    ) -> None:
        """Serve the endpoint, start ``background`` and run ``work`` until it returns.

        Then, in this order: ``drain`` (finish what is in hand), cancel the background
        loops, ``close`` (connections, broker), close the endpoint. A background loop
        must never end on its own: if one does, the service stops and its error is
        raised here once everything is shut down.
        """
        self._log.info(f"{self.component}.starting", **self.identity, **(starting or {}))
        server = None
        if self.metrics_port:
            server = await serve_http(
                self.metrics_port,
                self.registry,
                healthy=self.healthy,
                ready=self.ready,
                host=self.metrics_host,
            )
        tasks = [asyncio.create_task(run(), name=name) for name, run in background]
        for task in tasks:
            task.add_done_callback(self._background_ended)
        try:
            await work()
        finally:
            try:
                if drain is not None:
                    await drain()
            finally:
                for task in tasks:
                    task.remove_done_callback(self._background_ended)
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                try:
                    if close is not None:
                        await close()
                finally:
                    if server is not None:
                        server.close()
                    self._log.info(f"{self.component}.stopped", **self.identity)
        if self.failure is not None:
            raise self.failure

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self.failure = task.exception() or RuntimeError(f"{task.get_name()} ended")
        self._log.error(
            f"{self.component}.background_task_failed",
            task=task.get_name(),
            error=str(self.failure),
        )
        self.stop()


async def repeat(
    action: Callable[[], Awaitable[None]],
    interval: float,
    *,
    on_error: Callable[[Exception], None],
) -> None:
    """Run ``action`` now and every ``interval`` seconds until cancelled; an error goes to
    ``on_error`` and the loop goes on."""
    while True:
        try:
            await action()
        except Exception as exc:  # a periodic loop must outlive any error
            on_error(exc)
        await asyncio.sleep(interval)


async def purge_round(
    delete: Callable[[int], Awaitable[int]],
    *,
    batch: int = PURGE_BATCH,
    batches: int = PURGE_BATCHES_PER_ROUND,
    on_deleted: Callable[[int], None] | None = None,
) -> int:
    """Delete in bounded statements: ``delete(limit)`` deletes up to ``limit`` rows and
    returns how many it did. At most ``batches`` statements; stops at the first that
    deletes fewer than ``batch``. Returns the rows deleted."""
    total = 0
    for _ in range(batches):
        deleted = await delete(batch)
        total += deleted
        if deleted and on_deleted is not None:
            on_deleted(deleted)
        if deleted < batch:
            break
    return total


class Every:
    """True at most once per ``seconds`` (and the first time asked)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        """True, and the clock restarts, if ``seconds`` have passed since the last time."""
        now = time.monotonic()
        if self._last is not None and now - self._last <= self.seconds:
            return False
        self._last = now
        return True


async def run_until_signalled(service: Service) -> None:
    """Run ``service`` until SIGTERM or SIGINT asks it to stop (a signal during the
    shutdown asks again, which changes nothing)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    await service.run()
