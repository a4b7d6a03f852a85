"""Hostile input reaching a consumer: a spoofed topic header on RabbitMQ, oversized and
undecodable messages, and what a first delivery costs (no redelivery bookkeeping)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

import postroom
from postroom.brokers.base import HEADER_ERROR, HEADER_FOR_CONSUMER, HEADER_TOPIC
from postroom.brokers.memory import MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.message import HEADER_ID, Message
from postroom.schema import Tables
from tests.support.consuming import Rig, settings_for, unique
from tests.support.services import kafka_available, rabbitmq_available
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rabbitmq() -> Rig:
    rabbitmq_available()
    return Rig("rabbitmq")


@dataclass
class Prepared:
    """A consumer on a rig's fresh topics, with its service (not running yet)."""

    name: str
    consumer: postroom.Consumer
    topics: list[str]
    service: ConsumerService


async def prepare(
    rig: Rig, database_url: str, tables: Tables, prefix: str, *topics: str, **overrides: Any
) -> Prepared:
    """A consumer named after ``prefix`` on fresh ``topics`` (handlers are added by the test)."""
    name = unique(prefix)
    settings = settings_for(database_url, tables, **overrides)
    consumer = postroom.Consumer(name, settings)
    names = await rig.topics(*topics, consumer=name)
    return Prepared(
        name, consumer, names, ConsumerService(consumer, rig.subscriber(settings), settings)
    )


def recording(consumer: postroom.Consumer, *topics: str) -> dict[str, list[Message]]:
    """Handlers for ``topics`` that record what each received."""
    seen: dict[str, list[Message]] = {topic: [] for topic in topics}
    for topic in topics:

        def make(name: str) -> Any:
            async def handle(message: Message, session: AsyncSession) -> None:
                seen[name].append(message)

            return handle

        consumer.handler(topic)(make(topic))
    return seen


async def test_a_spoofed_topic_header_on_rabbitmq_never_chooses_the_handler(
    rabbitmq: Rig, database_url: str, tables: Tables
) -> None:
    run = await prepare(rabbitmq, database_url, tables, "spoof", "topic-a", "topic-b")
    a, b = run.topics
    seen = recording(run.consumer, a, b)
    async with rabbitmq.running(run.service, run.name):
        spoofed = str(uuid.uuid4())
        headers = {HEADER_ID: spoofed, HEADER_TOPIC: b, HEADER_FOR_CONSUMER: "someone-else"}
        await rabbitmq.publish_raw(a, b'{"x": 1}', headers, "application/json")
        await wait_until(lambda: seen[a], within=15, what="the message routed to topic A")
    assert [str(m.id) for m in seen[a]] == [spoofed]
    assert seen[b] == [], "the postroom-topic header chose the handler"


async def test_a_real_retry_on_rabbitmq_reaches_the_handler_of_its_topic(
    rabbitmq: Rig, database_url: str, tables: Tables
) -> None:
    run = await prepare(rabbitmq, database_url, tables, "retry-topic", "topic-a", "topic-b")
    consumer = run.consumer
    a, b = run.topics
    runs: list[tuple[str, int]] = []

    @consumer.handler(a)
    async def flaky(message: Message, session: AsyncSession) -> None:
        runs.append((a, len(runs)))
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    @consumer.handler(b)
    async def other(message: Message, session: AsyncSession) -> None:
        runs.append((b, len(runs)))

    async with rabbitmq.running(run.service, run.name):
        await rabbitmq.publish([Message.create(a, {"n": 1})])
        await wait_until(lambda: len(runs) >= 2, within=20, what="the retried message")
    assert [topic for topic, _ in runs] == [a, a]


@pytest.mark.parametrize("kind", ["memory", "rabbitmq", "kafka"])
async def test_a_message_over_the_consumer_limit_is_dead_lettered_without_its_body(
    kind: str, database_url: str, tables: Tables
) -> None:
    if kind == "rabbitmq":
        rabbitmq_available()
    if kind == "kafka":
        kafka_available()
    rig = Rig(kind)
    run = await prepare(
        rig, database_url, tables, "oversized", "big", consumer_max_message_bytes=4096
    )
    (topic,) = run.topics
    seen = recording(run.consumer, topic)
    big = Message.create(topic, {"blob": "x" * 8000}, key="k")
    small = Message.create(topic, {"blob": "small"}, key="k")
    async with rig.running(run.service, run.name):
        await rig.publish([big, small])
        await wait_until(lambda: seen[topic], within=30, what="the small message after it")
        ((body, headers),) = await rig.dead_letters(run.name, 1)
    assert [m.id for m in seen[topic]] == [small.id]
    assert body == b""
    assert headers[HEADER_ERROR].startswith("message of ")
    assert "exceeds consumer_max_message_bytes 4096" in headers[HEADER_ERROR]
    assert headers[HEADER_TOPIC] == topic
    if kind == "kafka":
        assert {"postroom-partition", "postroom-offset"} <= headers.keys()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"name": "\xff\xfe"}', "is not valid application/json"),
        (b"[" * 100_000 + b"]" * 100_000, "is not valid application/json"),
    ],
    ids=["invalid-utf8", "deep-json"],
)
async def test_an_undecodable_message_is_dead_lettered_with_its_reason(
    rabbitmq: Rig, database_url: str, tables: Tables, body: bytes, reason: str
) -> None:
    run = await prepare(rabbitmq, database_url, tables, "undecodable", "bad")
    (topic,) = run.topics
    seen = recording(run.consumer, topic)
    async with rabbitmq.running(run.service, run.name):
        headers = {HEADER_ID: str(uuid.uuid4())}
        await rabbitmq.publish_raw(topic, body, headers, "application/json")
        ((_, dead),) = await rabbitmq.dead_letters(run.name, 1)
    assert reason in dead[HEADER_ERROR]
    assert seen[topic] == []


async def test_first_deliveries_pay_no_redelivery_statement_and_redelivered_ones_one(
    database_url: str, tables: Tables
) -> None:
    rig = Rig("memory")
    run = await prepare(rig, database_url, tables, "hot-path", "hot")
    (topic,) = run.topics
    seen = recording(run.consumer, topic)
    service = run.service
    statements: list[str] = []

    def record(*args: Any) -> None:
        if "ctid" not in str(args[2]):  # not the retention purge, which runs in the background
            statements.append(str(args[2]))

    event.listen(service.processor._async_engine.sync_engine, "before_cursor_execute", record)
    async with rig.running(service, run.name):
        await rig.publish([Message.create(topic, {"n": n}) for n in range(5)])
        await wait_until(lambda: len(seen[topic]) == 5, within=15, what="five messages")
        first = [s for s in statements if "_attempts" in s]
        subscriber = service.subscriber
        assert isinstance(subscriber, MemorySubscriber)
        again = Message.create(topic, {"n": "again"})
        delivery = subscriber.deliver(again)
        delivery.redelivered = True
        await wait_until(lambda: len(seen[topic]) == 6, within=15, what="the redelivered one")
    assert first == [], "a first delivery touched the redelivery counts"
    touched = [s.split()[0] for s in statements if "_attempts" in s]
    assert touched == ["INSERT", "DELETE"], json.dumps(touched)
