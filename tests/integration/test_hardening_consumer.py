"""Trust boundaries of the consumer, against real PostgreSQL with the in-memory broker:
metric labels from a closed set, one UUID in any spelling handled once, and a
``postroom-for-consumer`` header honoured only on postroom's own requeue copies."""

from __future__ import annotations

import asyncio
import random
import string
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

import postroom
from postroom.brokers.base import HEADER_FOR_CONSUMER
from postroom.brokers.memory import MemoryBroker, MemoryDelivery, MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.message import HEADER_ID, Message
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.support.consuming import settings_for
from tests.support.network import http_get
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


@dataclass
class Running:
    service: ConsumerService
    subscriber: MemorySubscriber
    handled: list[postroom.Message]
    port: int

    def deliver(self, message: Message, **headers: str) -> MemoryDelivery:
        """Hand ``message`` out with ``headers`` put over its wire headers (a foreign producer)."""
        delivery = self.subscriber.deliver(message)
        delivery.headers.update(headers)  # before the receive loop can run: no await between
        return delivery


@pytest.fixture
async def running(
    database_url: str, tables: Tables, unused_tcp_port: int
) -> AsyncIterator[Running]:
    settings = settings_for(
        database_url, tables, metrics_port=unused_tcp_port, consumer_concurrency=8
    )
    consumer = postroom.Consumer(f"c{uuid.uuid4().hex[:8]}", settings)
    handled: list[postroom.Message] = []

    @consumer.handler("orders")
    async def handle(message: postroom.Message, session: Any) -> None:
        handled.append(message)

    subscriber = MemorySubscriber(MemoryBroker())
    service = ConsumerService(consumer, subscriber, settings)
    task = asyncio.create_task(service.run())
    await wait_until(lambda: service.ready, within=15)
    yield Running(service, subscriber, handled, unused_tcp_port)
    service.stop()
    await task


def raw(
    topic: str, message_id: uuid.UUID | None = None, headers: dict[str, str] | None = None
) -> Message:
    """A message as any producer could send it (no validation)."""
    now = datetime.now(UTC)
    return Message(
        id=message_id or uuid.uuid4(),
        topic=topic,
        body=b'{"n":1}',
        content_type="application/json",
        created_at=now,
        available_at=now,
        headers=dict(headers or {}),
    )


def junk(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(string.printable + "é€\u2028") for _ in range(size))


async def all_settled(deliveries: list[MemoryDelivery], within: float = 60.0) -> None:
    check: Callable[[], bool] = lambda: all(d.settled for d in deliveries)  # noqa: E731
    await wait_until(check, within=within)


async def test_random_topics_and_headers_do_not_grow_the_metrics(running: Running) -> None:
    warm = [running.deliver(raw("orders")), running.deliver(raw("unknown.topic"))]
    await all_settled(warm)
    status, before = await asyncio.to_thread(http_get, running.port, "/metrics")
    assert status == 200
    rng = random.Random(13)
    deliveries = []
    for n in range(2000):
        topic = "orders" if n % 10 == 0 else junk(rng, rng.randint(1, 60))
        headers = {junk(rng, 8): junk(rng, 20) for _ in range(3)}
        headers[HEADER_FOR_CONSUMER] = (
            junk(rng, 12) if n % 7 == 0 else running.service.consumer.name
        )
        deliveries.append(running.deliver(raw(topic, headers=headers)))
    await all_settled(deliveries, within=90)
    _, after = await asyncio.to_thread(http_get, running.port, "/metrics")
    assert len(after) < len(before) + 2048, f"/metrics grew from {len(before)} to {len(after)}"
    assert 'topic="other"' in after
    assert len(running.handled) >= 200


SPELLINGS: list[Callable[[uuid.UUID], str]] = [
    str,
    lambda u: str(u).upper(),
    lambda u: "{" + str(u) + "}",
    lambda u: "urn:uuid:" + str(u),
    lambda u: u.hex,
    lambda u: "  {" + u.hex.upper() + "}  ",
]


async def test_one_uuid_in_every_spelling_runs_the_handler_once(
    running: Running, engine: Engine, tables: Tables
) -> None:
    same = uuid.uuid4()
    deliveries = [
        running.deliver(raw("orders", same), **{HEADER_ID: spell(same)}) for spell in SPELLINGS
    ]
    await all_settled(deliveries)
    other = running.deliver(raw("orders"), **{HEADER_ID: "Order-17"})
    await all_settled([other])
    assert len(running.handled) == 2
    assert running.handled[0].id == same
    sql = f"SELECT message_id FROM {quoted_table(tables.inbox)} WHERE consumer = :c ORDER BY 1"
    with engine.connect() as connection:
        ids = connection.execute(text(sql), {"c": running.service.consumer.name}).scalars()
        assert list(ids) == sorted([str(same), "Order-17"])


async def test_a_foreign_for_consumer_header_is_warned_about_and_handled(
    running: Running,
) -> None:
    with capture_logs() as logs:
        foreign = running.deliver(
            raw("orders"), **{HEADER_ID: "ext-1", HEADER_FOR_CONSUMER: "someone-else"}
        )
        own_copy = running.deliver(raw("orders"), **{HEADER_FOR_CONSUMER: "someone-else"})
        await all_settled([foreign, own_copy])
    assert [m.headers for m in running.handled] == [{}]
    assert len(running.handled) == 1
    warnings = [e for e in logs if e["event"] == "consumer.foreign_for_consumer_header"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["for_consumer"] == "someone-else"
    assert own_copy.settled == "acked"
    assert [e["event"] for e in logs if e["event"] == "consumer.skipped"] == ["consumer.skipped"]
