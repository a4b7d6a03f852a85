"""Regression tests for consumer bugs found in review: each failed before its fix.

Real PostgreSQL throughout; RabbitMQ and Kafka (Tansu) where the bug is the broker's.
Lanes are driven by a scripted subscriber where the broker adds nothing but waiting.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom import testing
from postroom.backoff import Backoff
from postroom.brokers.memory import MemoryBroker, MemoryDelivery, MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.consumer.processing import Disposition, Processor
from postroom.database import create_async_engine, create_engine
from postroom.message import Message
from postroom.schema import Tables
from tests.support.consuming import (
    KAFKA_GROUP_SETTINGS,
    Running,
    publish,
    running,
    settings_for,
    unique,
)
from tests.support.readback import create_topics, delete_consumer_queues
from tests.support.services import (
    AMQP_URL,
    KAFKA_BOOTSTRAP,
    KAFKA_URL,
    kafka_available,
    rabbitmq_available,
)
from tests.support.waiting import wait_until

#: The consumer's plan for reconnecting to an unreachable database: 0.5 s doubling to 15 s.
RECONNECT = Backoff(initial=0.5, maximum=15.0)


class LaneDelivery:
    """A Kafka-like delivery: one lane, retried in place, cannot be released; settlements logged."""

    redeliverable = False
    redelivered = False
    revoked = False
    epoch = None
    broker_message_id = None
    key = None
    content_type = "application/json"
    attempt = 1

    def __init__(self, log: list[tuple[Any, ...]], lane: object, offset: int) -> None:
        self.log = log
        self.topic = "t"
        self.lane = lane
        self.offset = offset
        self.body = b'{"n": %d}' % offset
        self.headers = {
            "postroom-id": str(uuid.uuid4()),
            "postroom-content-type": "application/json",
        }

    async def ack(self) -> None:
        self.log.append(("ack", self.lane, self.offset))

    async def release(self) -> bool:
        return False

    async def retry_later(self, delay: float, error: str) -> None:
        raise NotImplementedError

    async def dead_letter(self, error: str, attempts: int) -> None:
        self.log.append(("dead_letter", self.lane, self.offset))


class ScriptedSubscriber:
    """Hands out the given deliveries (``None`` = pause 0.5 s), then waits for close()."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.closed = asyncio.Event()

    async def start(self, consumer: str, topics: Any) -> None:
        return None

    async def deliveries(self) -> AsyncIterator[Any]:
        for delivery in self.script:
            if delivery is None:
                await asyncio.sleep(0.5)
            else:
                yield delivery
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


# Bug 4: the concurrency slot is held only while a handler runs, not during backoff.
async def test_a_failing_partition_waiting_for_its_retry_does_not_block_the_others(
    database_url: str, tables: Tables
) -> None:
    consumer = postroom.Consumer(unique("slot"))
    handled: list[int] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        if message.payload["n"] == 0:
            raise RuntimeError("partition 0 always fails")
        handled.append(message.payload["n"])

    log: list[tuple[Any, ...]] = []
    script = [LaneDelivery(log, ("t", 0), 0)] + [LaneDelivery(log, ("t", 1), n) for n in (1, 2, 3)]
    settings = settings_for(
        database_url,
        tables,
        consumer_concurrency=1,
        consumer_backoff_initial=5.0,
        consumer_backoff_max=5.0,
    )
    async with running(ConsumerService(consumer, ScriptedSubscriber(script), settings)):
        await wait_until(lambda: handled == [1, 2, 3], within=2.0, detail=lambda: repr(handled))
    assert [entry for entry in log if entry[1] == ("t", 1)] == [
        ("ack", ("t", 1), n) for n in (1, 2, 3)
    ]


# Bug 2: a handler's own CancelledError is a failed attempt; the lane goes on in order.
async def test_handler_raising_cancelled_error_fails_the_attempt_and_keeps_the_lane(
    database_url: str, tables: Tables
) -> None:
    consumer = postroom.Consumer(unique("cancel"))
    runs: list[int] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        n = message.payload["n"]
        runs.append(n)
        if n == 0 and runs.count(0) == 1:
            task = asyncio.create_task(asyncio.sleep(10))
            await asyncio.sleep(0)
            task.cancel()
            await task  # the sub-task's CancelledError escapes the handler

    log: list[tuple[Any, ...]] = []
    lane = ("t", 0)
    script: list[Any] = [LaneDelivery(log, lane, n) for n in range(3)]
    script += [None, LaneDelivery(log, lane, 3)]
    async with running(
        ConsumerService(consumer, ScriptedSubscriber(script), settings_for(database_url, tables))
    ):
        await wait_until(lambda: len(log) == 4, within=5.0, detail=lambda: repr(log))
    assert runs == [0, 0, 1, 2, 3]
    assert log == [("ack", lane, n) for n in range(4)]


# Bug 1: a lane stops at a delivery that was neither acknowledged nor dead-lettered.
async def test_lane_without_release_never_acknowledges_past_an_unsettled_delivery(
    database_url: str, tables: Tables
) -> None:
    consumer = postroom.Consumer(unique("broken"))

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        return None

    log: list[tuple[Any, ...]] = []
    script = [LaneDelivery(log, ("t", 0), n) for n in range(3)] + [LaneDelivery(log, ("t", 1), 9)]
    # One message at a time: the failure is injected into the per-message path.
    settings = settings_for(database_url, tables, consumer_batch_size=1)
    service = ConsumerService(consumer, ScriptedSubscriber(script), settings)
    original = service.processor.process

    async def process(delivery: Any) -> Any:
        if delivery.offset == 0:
            raise RuntimeError("the broker failed while settling")
        return await original(delivery)

    service.processor.process = process  # type: ignore[method-assign]
    async with running(service):
        await wait_until(lambda: ("ack", ("t", 1), 9) in log, within=3.0, detail=lambda: repr(log))
        await asyncio.sleep(1.0)
    assert [entry for entry in log if entry[1] == ("t", 0)] == []


# Bug 3: only connection failures are "database unavailable"; the handler's SQL errors
# spend attempts and end dead-lettered; deliver(retries=True) never spins.
@pytest.mark.parametrize(
    "sqlstate",
    ["57014", "55P03", "40P01", "40001"],
    ids=["statement_timeout", "lock_timeout", "deadlock", "serialization_failure"],
)
async def test_handler_sql_errors_spend_attempts_and_are_dead_lettered(
    database_url: str, tables: Tables, sqlstate: str
) -> None:
    consumer = postroom.Consumer(unique("sqlerr"), settings_for(database_url, tables))
    runs = [0]

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        runs[0] += 1
        if sqlstate == "57014":
            await session.execute(text("SET LOCAL statement_timeout = '20ms'"))
            await session.execute(text("SELECT pg_sleep(1)"))
        await session.execute(
            text(f"DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '{sqlstate}'; END $$")
        )

    report = await asyncio.wait_for(
        testing.deliver(consumer, Message.create("t", {}), retries=True), 10
    )
    assert report.disposition is Disposition.DEAD_LETTERED
    assert report.attempts == 3
    assert runs[0] == 3


async def test_connection_failure_spends_no_attempt_and_deliver_does_not_spin(
    database_url: str, tables: Tables
) -> None:
    consumer = postroom.Consumer(unique("conn"), settings_for(database_url, tables))
    runs = [0]

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        runs[0] += 1
        await session.execute(
            text("DO $$ BEGIN RAISE EXCEPTION 'gone' USING ERRCODE = '57P01'; END $$")
        )

    # The database's own error, as SQLAlchemy raises it (57P01 admin_shutdown), not another.
    with pytest.raises(sa_exc.OperationalError, match="gone") as raised:
        await asyncio.wait_for(testing.deliver(consumer, Message.create("t", {}), retries=True), 10)
    assert type(raised.value) is sa_exc.OperationalError
    assert isinstance(raised.value.orig, psycopg.errors.AdminShutdown)
    assert runs[0] == testing.OUTAGE_TRIES

    waits: list[float] = []
    runs_at_wait: list[int] = []
    stopping = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        runs_at_wait.append(runs[0])
        if len(waits) >= 3:
            stopping.set()

    async_engine = create_async_engine(database_url)
    processor = Processor(
        consumer,
        consumer.settings,
        async_engine=async_engine,
        sync_engine=lambda: create_engine(database_url),
        stopping=stopping,
        sleep=sleep,
    )
    try:
        delivery = MemoryDelivery(_memory_subscriber(consumer), Message.create("t", {}), 1)
        result = await processor.process(delivery)
    finally:
        await async_engine.dispose()
    assert result.disposition is Disposition.ABANDONED
    assert result.attempts == 0
    assert delivery.settled is None
    # It does not spin: one run per wait, and each wait is the reconnect backoff's (half
    # to all of 0.5 s doubling), so the waits grow instead of the runs.
    first = testing.OUTAGE_TRIES
    assert runs_at_wait == [first + 1, first + 2, first + 3]
    assert runs[0] == first + 3, "a run after the consumer was stopping"
    assert len(waits) == 3
    for attempt, wait in enumerate(waits, start=1):
        planned = RECONNECT.nominal(attempt)
        assert planned / 2 <= wait <= planned, (attempt, waits)


def _memory_subscriber(consumer: postroom.Consumer) -> MemorySubscriber:
    subscriber = MemorySubscriber(MemoryBroker())
    subscriber.consumer = consumer.name
    return subscriber


async def test_foreign_id_the_inbox_cannot_store_is_dead_lettered_as_undecodable(
    database_url: str, tables: Tables
) -> None:
    settings = settings_for(database_url, tables, consumer_id_source="header:x-id")
    consumer = postroom.Consumer(unique("nul"), settings)

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        return None

    stopping = asyncio.Event()

    async def sleep(seconds: float) -> None:
        stopping.set()  # the old code waited for the database here, for ever

    async_engine = create_async_engine(database_url)
    processor = Processor(
        consumer,
        settings,
        async_engine=async_engine,
        sync_engine=lambda: create_engine(database_url),
        stopping=stopping,
        sleep=sleep,
    )
    subscriber = _memory_subscriber(consumer)
    delivery = MemoryDelivery(subscriber, Message.create("t", {}, headers={"x-id": "x"}), 1)
    delivery.headers["x-id"] = "abc\x00def"  # as read off the wire from another producer
    try:
        result = await asyncio.wait_for(processor.process(delivery), 10)
    finally:
        await async_engine.dispose()
    assert result.disposition is Disposition.DEAD_LETTERED
    assert result.error is not None
    assert "cannot be stored in the inbox" in result.error
    assert delivery.settled == "dead_lettered"
    assert len(subscriber.dead_lettered) == 1


# Bug 7: a handler committing its session only releases a savepoint.
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_handler_that_commits_itself_loses_nothing_when_it_then_fails(
    database_url: str, tables: Tables, engine: Engine, kind: str
) -> None:
    ledger = f'"{tables.schema}".ledger'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {ledger} (step text)"))
    consumer = postroom.Consumer(unique("selfcommit"), settings_for(database_url, tables))
    runs = [0]

    if kind == "async":

        @consumer.handler("t")
        async def handle(message: Message, session: AsyncSession) -> None:
            runs[0] += 1
            await session.execute(text(f"INSERT INTO {ledger} VALUES ('debit')"))
            await session.commit()
            await session.execute(text(f"INSERT INTO {ledger} VALUES ('credit')"))
            if runs[0] == 1:
                raise RuntimeError("transient failure after the commit")

    else:

        @consumer.handler("t")
        def handle_sync(message: Message, session: Session) -> None:
            runs[0] += 1
            session.execute(text(f"INSERT INTO {ledger} VALUES ('debit')"))
            session.commit()
            session.execute(text(f"INSERT INTO {ledger} VALUES ('credit')"))
            if runs[0] == 1:
                raise RuntimeError("transient failure after the commit")

    report = await testing.deliver(consumer, Message.create("t", {}), retries=True)
    assert report.disposition is Disposition.HANDLED
    assert report.attempts == 2
    with engine.connect() as connection:
        steps = [row[0] for row in connection.execute(text(f"SELECT step FROM {ledger}"))]
    assert steps == ["debit", "credit"]


async def _rabbit_queue_count(name: str) -> int | None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, durable=True, passive=True)
        except Exception:
            return None
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


def _always_failing(prefix: str) -> tuple[str, str, postroom.Consumer]:
    """A consumer named ``prefix-...`` whose handler for a fresh topic always fails."""
    name, topic = unique(prefix), unique("topic")
    consumer = postroom.Consumer(name)

    @consumer.handler(topic)
    async def handle(message: Message, session: AsyncSession) -> None:
        raise RuntimeError("always fails")

    return name, topic, consumer


def _rabbitmq_service(consumer: postroom.Consumer, settings: postroom.Settings) -> ConsumerService:
    from postroom.brokers.rabbitmq import RabbitMQSubscriber

    return ConsumerService(consumer, RabbitMQSubscriber(AMQP_URL, prefetch=4), settings)


def _running_on_rabbitmq(service: ConsumerService) -> AbstractAsyncContextManager[Running]:
    """:func:`running`, removing the consumer's queues afterwards."""
    return running(service, cleanup=lambda: delete_consumer_queues(AMQP_URL, service.consumer.name))


# Bug 6: an unroutable dead-letter copy is a failure; the missing queue is declared again.
async def test_rabbitmq_dead_letter_queue_deleted_while_running_is_declared_again(
    database_url: str, tables: Tables
) -> None:
    rabbitmq_available()
    import aio_pika

    name, topic, consumer = _always_failing("rmq-ret")
    settings = settings_for(database_url, tables, consumer_max_attempts=1)
    async with _running_on_rabbitmq(_rabbitmq_service(consumer, settings)) as run:
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        await channel.queue_delete(f"{name}.dead-letter")  # an operator removes it
        await connection.close()
        await publish(AMQP_URL, [Message.create(topic, {"x": 1})])
        await wait_until(
            lambda: run.service.metrics.dead_lettered.labels(topic)._value.get() == 1, within=5
        )
        await run.stop()
        assert await _rabbit_queue_count(f"{name}.dead-letter") == 1
        assert await _rabbit_queue_count(name) == 0


# Bug 5: once the dead-letter copy is confirmed, a failing ack never publishes another.
async def test_rabbitmq_failed_ack_after_dead_letter_copy_publishes_no_second_copy(
    database_url: str, tables: Tables, monkeypatch: pytest.MonkeyPatch
) -> None:
    rabbitmq_available()
    import aio_pika
    import aiormq

    name, topic, consumer = _always_failing("rmq-dlq")

    async def ack_on_a_dead_channel(self: Any, multiple: bool = False) -> None:
        raise aiormq.exceptions.ChannelInvalidStateError("channel closed")

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", ack_on_a_dead_channel)
    settings = settings_for(database_url, tables, consumer_max_attempts=1)
    async with _running_on_rabbitmq(_rabbitmq_service(consumer, settings)) as run:
        await publish(AMQP_URL, [Message.create(topic, {"x": 1})])
        dead_letters = f"{name}.dead-letter"
        await wait_until(lambda: _rabbit_queue_count(dead_letters), within=5, interval=0.1)
        await asyncio.sleep(2.0)  # the old code published a copy per reconnect backoff round
        assert await _rabbit_queue_count(dead_letters) == 1
        assert run.service.metrics.dead_lettered.labels(topic)._value.get() == 1


# Bug 8: an unsettled RabbitMQ delivery is requeued at once (basic.nack), not left unacked.
async def test_rabbitmq_unsettled_delivery_is_requeued_and_handled(
    database_url: str, tables: Tables
) -> None:
    rabbitmq_available()
    name, topic = unique("rmq-nack"), unique("topic")
    consumer = postroom.Consumer(name)
    handled: list[int] = []

    @consumer.handler(topic)
    async def handle(message: Message, session: AsyncSession) -> None:
        handled.append(message.payload["x"])

    service = _rabbitmq_service(consumer, settings_for(database_url, tables))
    original = service.processor.process
    calls = [0]

    async def process(delivery: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("the broker failed while settling")
        return await original(delivery)

    service.processor.process = process  # type: ignore[method-assign]
    async with _running_on_rabbitmq(service):
        await publish(AMQP_URL, [Message.create(topic, {"x": 1})])
        await wait_until(lambda: handled == [1], within=5, detail=lambda: repr((calls, handled)))


# Bug 1 on Kafka: an unsettled record rewinds its partition; nothing is committed past it.
async def test_kafka_partition_is_rewound_to_an_unsettled_record(
    database_url: str, tables: Tables
) -> None:
    kafka_available()
    from postroom.brokers.kafka import KafkaSubscriber

    name, topic = unique("kafka-rewind"), unique("topic")
    await asyncio.to_thread(
        create_topics, KAFKA_BOOTSTRAP, [topic, f"{name}.dead-letter"], partitions=1
    )
    await publish(KAFKA_URL, [Message.create(topic, {"n": n}, key="k") for n in range(3)])

    consumer = postroom.Consumer(name)
    handled: list[int] = []

    @consumer.handler(topic)
    async def handle(message: Message, session: AsyncSession) -> None:
        handled.append(message.payload["n"])

    subscriber = KafkaSubscriber.from_url(f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}", prefetch=16)
    service = ConsumerService(consumer, subscriber, settings_for(database_url, tables))
    original = service.processor.process
    failed: list[int] = []

    async def process(delivery: Any) -> Any:
        if delivery.offset == 0 and not failed:
            failed.append(0)
            raise RuntimeError("the broker failed while settling")
        return await original(delivery)

    service.processor.process = process  # type: ignore[method-assign]
    async with running(service):
        await wait_until(lambda: len(handled) >= 3, within=20, detail=lambda: repr(handled))
    assert handled == [0, 1, 2]
