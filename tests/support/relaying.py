"""A relay in the test's event loop: its settings for tests, and running it for a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from postroom import Settings
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
