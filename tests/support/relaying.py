"""A relay in the test's event loop: its settings for tests, running it for a block, and a
publisher that notes when each message was sent."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from postroom import Settings
from postroom.brokers.base import Publisher, PublishResult
from postroom.message import Message
from postroom.relay import Relay
from postroom.schema import Tables


def relay_settings(database_url: str, tables: Tables, **overrides: Any) -> Settings:
    """Relay settings with short leases and backoff, so tests run in seconds."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "schema": tables.schema or "",
        "relay_lease": 2.0,
        "relay_poll_interval": 0.2,
        "relay_backoff_initial": 0.2,
        "relay_backoff_max": 0.5,
        "relay_max_attempts": 3,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_relay(relay: Relay) -> AsyncIterator[Relay]:
    """Run the relay in the background for the duration of the block."""
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(task, 15)


def outbox_rows(engine: Engine, tables: Tables) -> list[Any]:
    """Every outbox row, in position order."""
    with engine.connect() as connection:
        return list(
            connection.execute(select(tables.outbox).order_by(tables.outbox.c.position)).all()
        )


class TimedPublisher:
    """A real publisher that also notes when each message was handed to it: ``sent[id]`` is
    the ``time.monotonic()`` of every publish of that message, in order (one per attempt)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.sent: dict[uuid.UUID, list[float]] = {}

    async def connect(self) -> None:
        """Connect the wrapped publisher."""
        await self.publisher.connect()

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        """Note the time for each message of ``batch``, then publish it."""
        now = time.monotonic()
        for message in batch:
            self.sent.setdefault(message.id, []).append(now)
        return await self.publisher.publish(batch)

    async def close(self) -> None:
        """Close the wrapped publisher."""
        await self.publisher.close()
