"""Wake the relay when rows are committed: LISTEN on a dedicated connection.

Notifications only shorten the wait: the relay also polls, so nothing depends on a
notification arriving. The listening connection is health-checked between waits and
re-established with backoff after any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg

from postroom.backoff import Backoff
from postroom.log import get_logger
from postroom.schema.sql import quote_identifier

log = get_logger("relay.wakeup")


class Wakeup:
    """An event set by NOTIFY on the outbox's channel."""

    def __init__(self, conninfo: str, channel: str, *, health_interval: float = 10.0) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._health_interval = health_interval
        self._event = asyncio.Event()
        self.listening = False

    def set(self) -> None:
        """Wake the waiter now (for example on shutdown)."""
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Return on the next notification, or after ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._event.wait()
        self._event.clear()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff after failures."""
        backoff = Backoff(initial=0.5, maximum=15.0)
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=10
                ) as connection:
                    await self._listen(connection)
                    failures = 0
            except (psycopg.Error, OSError) as exc:
                self.listening = False
                failures += 1
                delay = backoff.delay(failures)
                log.warning("wakeup.disconnected", error=str(exc).strip(), retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    async def _listen(self, connection: psycopg.AsyncConnection[Any]) -> None:
        await connection.execute(f"LISTEN {quote_identifier(self._channel)}")
        self.listening = True
        log.info("wakeup.listening", channel=self._channel)
        # Rows may have been committed while nobody listened.
        self._event.set()
        while True:
            async for _ in connection.notifies(timeout=self._health_interval):
                self._event.set()
            await connection.execute("SELECT 1")
