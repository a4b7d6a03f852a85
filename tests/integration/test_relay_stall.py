"""A key held back in one batch must not hold itself back for ever.

A claim read before a batch is recorded holds back the keys that were not confirmed in
that batch. The next claim is always read before the batch just published is recorded,
so when a key's pending rows alternate between two claims (each read while the other is
in flight), each claim's held rows would hold back the other's: the relay would claim,
hold and record the same rows in a loop, silently, while keeping their partition. A row
is only held back by an unconfirmed row of its key that comes before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom import Settings
from postroom.brokers.base import PublishResult
from postroom.brokers.memory import MemoryBroker
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.schema import Tables
from tests.support.relaying import outbox_rows, relay_settings, running_relay
from tests.support.waiting import wait_until

#: Bytes the in-memory broker accepts per message: the first row is larger, so it is
#: refused for good (dead-lettered at once) and holds its key back in its batch.
LIMIT = 1000


class WriteDuringFirstPublish:
    """A memory publisher that commits one more row while its first batch is published."""

    def __init__(self, broker: MemoryBroker, write: Callable[[], None]) -> None:
        self._publisher = broker.publisher()
        self._write: Callable[[], None] | None = write

    async def connect(self) -> None:
        """Connect the memory publisher."""
        await self._publisher.connect()

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        """Commit the extra row (first call only), then publish ``batch``."""
        write, self._write = self._write, None
        if write is not None:
            await asyncio.to_thread(write)
        return await self._publisher.publish(batch)

    async def close(self) -> None:
        """Close the memory publisher."""
        await self._publisher.close()


def enqueue(engine: Engine, outbox: Outbox, payloads: list[Any]) -> None:
    with Session(engine) as session:
        outbox.enqueue_many(session, [outbox.message("t", p, key="k") for p in payloads])
        session.commit()


async def test_rows_held_back_in_alternate_batches_are_published_in_order(
    database_url: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    # One batch: a row the broker refuses, then the next row of its key (held back in the
    # batch). While it is published a third row of the key commits, so the next claim
    # (read before the first batch is recorded) takes it alone, and it is held back by
    # the first batch; the claim after that takes the second row alone, and so on.
    enqueue(engine, outbox, ["x" * (2 * LIMIT), "second"])
    broker = MemoryBroker(max_message_bytes=LIMIT)
    publisher = WriteDuringFirstPublish(broker, lambda: enqueue(engine, outbox, ["third"]))
    settings: Settings = relay_settings(database_url, tables)
    async with running_relay(Relay(settings, publisher)):
        await wait_until(lambda: len(broker.messages()) == 2, within=10)
        await wait_until(
            lambda: (
                [r.status for r in outbox_rows(engine, tables)]
                == ["dead", "published", "published"]
            ),
            within=10,
        )
    assert [m.payload for m in broker.messages()] == ["second", "third"]
