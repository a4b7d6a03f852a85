"""Batch handlers (``@consumer.batch_handler``): a topic's messages of a batch in one call.

The call runs in the batch's transaction; if it raises, nothing of the batch is written
and each of its messages is handled alone (a list of one), where a failure takes the
usual retry path. Real PostgreSQL, RabbitMQ and Kafka.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pydantic
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

import postroom
from postroom import testing, tracing
from postroom.brokers.memory import MemoryBroker, MemoryDelivery, MemorySubscriber
from postroom.config import Settings
from postroom.consumer import ConsumerService, Disposition, Processor
from postroom.consumer.batching import BatchProcessor
from postroom.database import create_async_engine, create_engine
from postroom.errors import ConfigurationError
from postroom.message import Message
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.support.consuming import Rig, settings_for, unique
from tests.support.services import kafka_available, rabbitmq_available
from tests.support.waiting import wait_until

BROKERS = ["rabbitmq", "kafka"]
#: The message a batch handler fails on. On Kafka the first batch after the partition is
#: assigned goes the one-message path (its first record counts as redelivered, and a batch
#: takes only the leading run it can handle), so the poison comes after the first 16.
POISON = 24


@pytest.fixture
def effects(engine: Engine, tables: Tables) -> str:
    """A business table: the rows a batch handler's calls committed, with the call's number."""
    name = f'"{tables.schema}".effects'
    with engine.begin() as connection:
        connection.execute(
            text(f"CREATE TABLE {name} (seq bigserial, message_id text, n int, call int)")
        )
    return name


def _rows(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as connection:
        return [row[0] for row in connection.execute(text(sql))]


def _inbox(engine: Engine, tables: Tables, consumer: str) -> list[str]:
    inbox = quoted_table(tables.inbox)
    return _rows(engine, f"SELECT message_id FROM {inbox} WHERE consumer = '{consumer}'")


async def _insert_all(
    session: AsyncSession, effects: str, messages: list[Message], call: int
) -> None:
    """One bulk INSERT for the whole list."""
    await session.execute(
        text(f"INSERT INTO {effects} (message_id, n, call) VALUES (:i, :n, :c)"),
        [{"i": str(m.id), "n": m.payload["n"], "c": call} for m in messages],
    )


def _available(broker: str) -> None:
    (rabbitmq_available if broker == "rabbitmq" else kafka_available)()


async def _batching_consumer(
    broker: str, database_url: str, tables: Tables, prefix: str
) -> tuple[Rig, str, str, Settings, postroom.Consumer]:
    """A rig on ``broker``, a consumer named from ``prefix`` batching up to 16 messages, its
    topic and settings."""
    _available(broker)
    rig = Rig(broker)
    name = unique(prefix)
    (topic,) = await rig.topics("rows", consumer=name)
    settings = settings_for(
        database_url, tables, consumer_batch_size=16, consumer_batch_linger=0.05
    )
    return rig, name, topic, settings, postroom.Consumer(name, settings)


@pytest.mark.parametrize("broker", BROKERS)
async def test_batch_handler_gets_lists_and_each_message_once_also_when_duplicated(
    database_url: str, tables: Tables, engine: Engine, effects: str, broker: str
) -> None:
    rig, name, topic, settings, consumer = await _batching_consumer(
        broker, database_url, tables, "bulk"
    )
    calls: list[list[str]] = []

    @consumer.batch_handler(topic)
    async def insert_all(messages: list[Message], session: AsyncSession) -> None:
        calls.append([str(m.id) for m in messages])
        if len(calls) == 1:  # the others arrive meanwhile, and come in batches
            await asyncio.sleep(0.3)
        await _insert_all(session, effects, messages, len(calls))

    messages = [Message.create(topic, {"n": n}, key=f"k{n % 2}") for n in range(50)]
    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    handled = service.metrics.handled.labels(topic)
    duplicates = service.metrics.duplicates.labels(topic)
    async with rig.running(service, name):
        # Three copies too many: one right behind its original, two far behind theirs.
        await rig.publish([*messages[:49], messages[49], messages[49], messages[0], messages[7]])
        await wait_until(lambda: duplicates._value.get() >= 3, within=20, what="3 duplicates")
        await wait_until(lambda: handled._value.get() >= 50, within=20, what="50 handled")
    assert max(len(call) for call in calls) > 1, f"never called with a batch: {calls}"
    every = [message_id for call in calls for message_id in call]
    assert collections.Counter(every) == {str(m.id): 1 for m in messages}
    assert handled._value.get() == 50
    counts = collections.Counter(_rows(engine, f"SELECT n FROM {effects}"))
    assert counts == dict.fromkeys(range(50), 1)
    assert sorted(_inbox(engine, tables, name)) == sorted(str(m.id) for m in messages)


@pytest.mark.parametrize("broker", BROKERS)
async def test_failed_batch_call_writes_nothing_and_only_the_poison_is_dead_lettered(
    database_url: str, tables: Tables, engine: Engine, effects: str, broker: str
) -> None:
    rig, name, topic, settings, consumer = await _batching_consumer(
        broker, database_url, tables, "bulkpoison"
    )
    calls: list[list[int]] = []
    failed: list[int] = []

    @consumer.batch_handler(topic)
    async def insert_all(messages: list[Message], session: AsyncSession) -> None:
        calls.append([m.payload["n"] for m in messages])
        if len(calls) == 1:  # the others arrive meanwhile, and come in batches
            await asyncio.sleep(0.3)
        await _insert_all(session, effects, messages, len(calls))
        if POISON in calls[-1]:
            failed.append(len(calls))
            raise RuntimeError("poison")

    messages = [Message.create(topic, {"n": n}, key="one-key") for n in range(30)]
    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    dead = service.metrics.dead_lettered.labels(topic)
    handled = service.metrics.handled.labels(topic)
    async with rig.running(service, name):
        await rig.publish(messages)
        await wait_until(lambda: dead._value.get() >= 1, within=20, what="poison dead-lettered")
        await wait_until(lambda: handled._value.get() >= 29, within=20, what="29 handled")
        letters = await rig.dead_letters(name, 1)
    assert any(len(calls[number - 1]) > 1 for number in failed), f"no batch failed: {calls}"
    # Each failed call rolled its batch back: none of its rows was committed.
    assert _rows(engine, f"SELECT count(*) FROM {effects} WHERE call = ANY(ARRAY{failed})") == [0]
    counts = collections.Counter(_rows(engine, f"SELECT n FROM {effects}"))
    assert counts == {n: 1 for n in range(30) if n != POISON}
    # Alone, the poison spent its attempts, then went to the dead letters with its error.
    assert calls.count([POISON]) == settings.consumer_max_attempts
    assert letters[0][1]["postroom-error"] == "RuntimeError: poison"
    assert letters[0][1]["postroom-id"] == str(messages[POISON].id)
    poison = str(messages[POISON].id)
    assert sorted(_inbox(engine, tables, name)) == sorted(
        str(m.id) for m in messages if str(m.id) != poison
    )
    if broker == "kafka":  # one partition: in order, the poison's followers after it
        assert _rows(engine, f"SELECT n FROM {effects} ORDER BY seq") == [
            n for n in range(30) if n != POISON
        ]


class Row(pydantic.BaseModel):
    """A payload model."""

    n: int


async def test_batch_size_one_calls_with_a_list_of_one_and_models_from_the_annotation(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    consumer = postroom.Consumer(unique("single"), settings_for(database_url, tables))
    received: list[list[Any]] = []

    @consumer.batch_handler("rows")
    async def insert_all(rows: list[Row], session: AsyncSession) -> None:
        received.append(rows)

    report = await testing.deliver(consumer, Message.create("rows", {"n": 5}))
    assert report.disposition is Disposition.HANDLED
    assert received == [[Row(n=5)]]
    assert len(_inbox(engine, tables, consumer.name)) == 1


def test_a_topic_takes_a_handler_or_a_batch_handler_not_both() -> None:
    consumer = postroom.Consumer("registry")

    @consumer.handler("a")
    async def one(message: Message, session: AsyncSession) -> None: ...

    with pytest.raises(ConfigurationError, match="'a' already has a handler"):

        @consumer.batch_handler("a")
        async def many(messages: list[Message], session: AsyncSession) -> None: ...

    @consumer.batch_handler("b")
    async def many_b(messages: list[Message], session: AsyncSession) -> None: ...

    with pytest.raises(ConfigurationError, match="'b' already has a batch handler"):

        @consumer.handler("b")
        async def one_b(message: Message, session: AsyncSession) -> None: ...

    with pytest.raises(ConfigurationError, match="must be an 'async def'"):

        @consumer.batch_handler("c")
        def sync(messages: list[Message], session: Any) -> None: ...

    assert consumer.topics == ["a", "b"]
    spec = consumer.handler_for("b")
    assert spec is not None
    assert spec.batch
    assert spec.function is many_b


def _memory(consumer: postroom.Consumer, messages: list[Message]) -> list[MemoryDelivery]:
    subscriber = MemorySubscriber(MemoryBroker())
    subscriber.consumer = consumer.name
    return [MemoryDelivery(subscriber, m, 1) for m in messages]


def _processor(consumer: postroom.Consumer, database_url: str) -> Processor:
    return Processor(
        consumer,
        consumer.settings,
        async_engine=create_async_engine(database_url, pool_size=2),
        sync_engine=lambda: create_engine(database_url),
    )


async def test_failed_call_beside_a_handler_leaves_the_batch_unacked_for_one_by_one(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    """In a batch of two topics, the batch handler's failure rolls back the whole batch:
    nothing written, nothing acknowledged. Handled alone afterwards, in order, the good
    ones commit and the poison is retried."""
    consumer = postroom.Consumer(
        unique("mixed"), settings_for(database_url, tables, consumer_batch_size=16)
    )
    calls: list[list[int]] = []

    @consumer.handler("one")
    async def one(message: Message, session: AsyncSession) -> None:
        await _insert_all(session, effects, [message], 0)

    @consumer.batch_handler("many")
    async def many(messages: list[Message], session: AsyncSession) -> None:
        calls.append([m.payload["n"] for m in messages])
        await _insert_all(session, effects, messages, len(calls))
        if 2 in calls[-1]:
            raise RuntimeError("poison")

    topics = ["one", "many", "many", "one"]
    messages = [Message.create(t, {"n": n}) for n, t in enumerate(topics)]
    deliveries = _memory(consumer, messages)
    processor = _processor(consumer, database_url)
    try:
        results = await BatchProcessor(processor).process(deliveries)
        assert results == [None] * 4  # each handled alone by the caller, after the batch
        assert [d.settled for d in deliveries] == [None] * 4
        assert _rows(engine, f"SELECT n FROM {effects}") == []
        assert not _inbox(engine, tables, consumer.name)
        alone = [await processor.process(d) for d in deliveries]
    finally:
        await processor.async_engine.dispose()
    assert calls == [[1, 2], [1], [2]]
    assert [r.disposition for r in alone] == [
        Disposition.HANDLED,
        Disposition.HANDLED,
        Disposition.RETRYING,
        Disposition.HANDLED,
    ]
    assert [d.settled for d in deliveries] == ["acked", "acked", "retried", "acked"]
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 1, 3]
    assert len(_inbox(engine, tables, consumer.name)) == 3


async def test_a_call_with_several_messages_runs_in_one_span_linked_to_each_of_theirs(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    consumer = postroom.Consumer(
        unique("spans"), settings_for(database_url, tables, consumer_batch_size=16)
    )

    @consumer.batch_handler("rows")
    async def insert_all(messages: list[Message], session: AsyncSession) -> None:
        await _insert_all(session, effects, messages, 1)

    traces = [f"{n:032x}" for n in range(1, 4)]
    messages = [
        Message.create("rows", {"n": n}, headers={"traceparent": f"00-{t}-{n + 1:016x}-01"})
        for n, t in enumerate(traces)
    ]
    deliveries = _memory(consumer, messages)
    processor = _processor(consumer, database_url)
    tracing.use_provider(provider)
    try:
        results = await BatchProcessor(processor).process(deliveries)
    finally:
        tracing.use_provider(None)
        await processor.async_engine.dispose()
    assert [r.disposition if r else None for r in results] == [Disposition.HANDLED] * 3
    assert [d.settled for d in deliveries] == ["acked"] * 3
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 1, 2]
    (span,) = exporter.get_finished_spans()
    assert span.name == "rows process"
    assert span.kind is SpanKind.CONSUMER
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 3
    assert span.context is not None
    assert span.context.trace_id not in {int(t, 16) for t in traces}  # a trace of its own
    assert [link.context.trace_id for link in span.links] == [int(t, 16) for t in traces]
