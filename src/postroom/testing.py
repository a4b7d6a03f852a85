"""Helpers for testing your own consumers: run a message through the handlers for real.

    report = await postroom.testing.deliver(consumer, Message.create("orders.created", {...}))
    assert report.disposition is Disposition.HANDLED

The message goes through the same path as in production (inbox row, handler, commit, then
acknowledgement) against a real PostgreSQL database, on the in-memory broker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from postroom.brokers.memory import MemoryBroker, MemoryDelivery, MemorySubscriber
from postroom.config import Settings
from postroom.consumer.processing import Disposition, Processor
from postroom.consumer.registry import Consumer
from postroom.database import create_async_engine, create_engine
from postroom.message import Message

__all__ = ["DeliveryReport", "Disposition", "deliver"]

#: Tries in a row after which deliver() raises the error of an unreachable database.
OUTAGE_TRIES = 3


@dataclass(frozen=True)
class DeliveryReport:
    """What happened to a message given to :func:`deliver`."""

    disposition: Disposition
    """HANDLED, DUPLICATE, FAILED (retries off) or DEAD_LETTERED."""
    error: str | None
    """The handler's last error (``Type: text``) or the dead-letter reason."""
    attempts: int
    """Handler runs made (1 unless retried)."""
    acknowledged: bool
    """True if the broker would have been told the message is done."""
    dead_letter: Message | None = None
    """The copy put on ``<consumer>.dead-letter``, with its error and attempt headers."""


async def deliver(
    consumer: Consumer,
    message: Message,
    *,
    database_url: str | None = None,
    settings: Settings | None = None,
    retries: bool = False,
) -> DeliveryReport:
    """Run ``message`` through ``consumer``'s handler once, as a broker delivery would.

    The database is ``database_url`` (else the consumer's settings'). Deliver the same
    message twice to see the second one come back as DUPLICATE. With ``retries=False`` a
    failing handler gives FAILED at once; with ``retries=True`` it is retried (without
    waiting) up to ``consumer_max_attempts`` and ends DEAD_LETTERED. If the database cannot
    be reached (three tries in a row), its error is raised instead of waiting for it.
    """
    base = settings or consumer.settings
    if database_url is not None:
        base = dataclasses.replace(base, database_url=database_url)
    async_engine = create_async_engine(base.database_url, pool_size=2)
    sync_engines: list[Engine] = []

    def sync_engine() -> Engine:
        if not sync_engines:
            sync_engines.append(create_engine(base.database_url, pool_size=2))
        return sync_engines[0]

    async def no_wait(_seconds: float) -> None:
        return None

    processor = Processor(
        consumer,
        base,
        async_engine=async_engine,
        sync_engine=sync_engine,
        sleep=no_wait,
        max_outages=OUTAGE_TRIES,
    )
    subscriber = MemorySubscriber(MemoryBroker())
    subscriber.consumer = consumer.name
    try:
        attempt = 1
        while True:
            delivery = MemoryDelivery(subscriber, message, attempt)
            result = await processor.process(delivery)
            if result.disposition is Disposition.RETRYING:
                if not retries:
                    return DeliveryReport(Disposition.FAILED, result.error, attempt, False)
                attempt += 1
                continue
            return DeliveryReport(
                result.disposition,
                result.error,
                result.attempts,
                delivery.settled in {"acked", "dead_lettered"},
                subscriber.dead_lettered[-1] if subscriber.dead_lettered else None,
            )
    finally:
        await async_engine.dispose()
        for engine in sync_engines:
            engine.dispose()
