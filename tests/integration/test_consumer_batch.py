"""Batched transactions: a batch's handlers share one transaction (no savepoints); one inbox
statement, one commit, then the acknowledgements; a failure sends the batch one by one.

Real PostgreSQL throughout. The batch itself is driven with memory deliveries (a queue:
no order) and scripted lane deliveries (a partition: in order); then whole consumers on
RabbitMQ and Kafka.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import postroom
from postroom.brokers.memory import MemoryBroker, MemoryDelivery, MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.consumer.batching import BatchProcessor
from postroom.consumer.processing import Disposition, Processor
from postroom.database import create_async_engine, create_engine
from postroom.errors import ConfigurationError
from postroom.message import Message
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.integration.test_consumer_regressions import LaneDelivery, ScriptedSubscriber
from tests.support.consuming import Rig, settings_for, unique
from tests.support.services import kafka_available, rabbitmq_available
from tests.support.waiting import wait_until

#: The default batch size, asked for explicitly: these tests are about batches.
BATCH = 16


@pytest.fixture
def effects(engine: Engine, tables: Tables) -> str:
    """A business table: one row per handler run that committed."""
    name = f'"{tables.schema}".effects'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (seq bigserial, message_id text, n int)"))
    return name


async def _write_effect(session: AsyncSession, effects: str, message: Message) -> None:
    await session.execute(
        text(f"INSERT INTO {effects} (message_id, n) VALUES (:i, :n)"),
        {"i": str(message.id), "n": message.payload["n"]},
    )


def _rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as connection:
        return [row[0] for row in connection.execute(text(sql), params)]


def _inbox(engine: Engine, tables: Tables, consumer: str) -> set[str]:
    inbox = quoted_table(tables.inbox)
    return set(_rows(engine, f"SELECT message_id FROM {inbox} WHERE consumer = :c", c=consumer))


class Logged(MemoryDelivery):
    """A memory delivery that writes its acknowledgement into a shared event log."""

    log: list[str]

    async def ack(self) -> None:
        self.log.append(f"ack {self.message.payload['n']}")
        await super().ack()


def _batched(database_url: str, tables: Tables, prefix: str) -> postroom.Consumer:
    """A consumer named after ``prefix`` that handles batches of up to ``BATCH``."""
    return postroom.Consumer(
        unique(prefix), settings_for(database_url, tables, consumer_batch_size=BATCH)
    )


def _processor(consumer: postroom.Consumer, database_url: str) -> tuple[Processor, AsyncEngine]:
    async_engine = create_async_engine(database_url, pool_size=2)
    processor = Processor(
        consumer,
        consumer.settings,
        async_engine=async_engine,
        sync_engine=lambda: create_engine(database_url),
    )
    return processor, async_engine


def _deliveries(
    consumer: postroom.Consumer, messages: list[Message], log: list[str]
) -> list[Logged]:
    subscriber = MemorySubscriber(MemoryBroker())
    subscriber.consumer = consumer.name
    out = []
    for message in messages:
        delivery = Logged(subscriber, message, 1)
        delivery.log = log
        out.append(delivery)
    return out


async def test_batch_commits_once_then_acks(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    consumer = _batched(database_url, tables, "batch")
    log: list[str] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        log.append(f"run {message.payload['n']}")
        await _write_effect(session, effects, message)

    messages = [Message.create("t", {"n": n}) for n in range(5)]
    deliveries = _deliveries(consumer, messages, log)
    processor, async_engine = _processor(consumer, database_url)
    statements: list[str] = []
    event.listen(async_engine.sync_engine, "commit", lambda _c: log.append("commit"))
    event.listen(
        async_engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _cur, sql, *_a: statements.append(sql.split()[0].upper()),
    )
    try:
        results = await BatchProcessor(processor).process(deliveries)
    finally:
        await async_engine.dispose()
    assert [r.disposition if r else None for r in results] == [Disposition.HANDLED] * 5
    # One commit, after every handler ran; nothing acknowledged before it.
    assert log == [*(f"run {n}" for n in range(5)), "commit", *(f"ack {n}" for n in range(5))]
    # One inbox statement, each handler's insert, and no savepoint.
    assert statements == ["INSERT"] * 6
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 1, 2, 3, 4]
    assert _inbox(engine, tables, consumer.name) == {str(m.id) for m in messages}


async def test_a_failing_handler_rolls_the_batch_back_and_each_goes_alone(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    """Nothing of the batch is committed or acknowledged; alone, in order, the others
    commit and the failing one takes the retry path (its failed run in the batch does
    not count as an attempt)."""
    consumer = _batched(database_url, tables, "batch")
    log: list[str] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        n = message.payload["n"]
        log.append(f"run {n}")
        await _write_effect(session, effects, message)
        if n == 2:
            raise RuntimeError("no")

    messages = [Message.create("t", {"n": n}) for n in range(5)]
    deliveries = _deliveries(consumer, messages, log)
    processor, async_engine = _processor(consumer, database_url)
    event.listen(async_engine.sync_engine, "commit", lambda _c: log.append("commit"))
    try:
        assert await BatchProcessor(processor).process(deliveries) == [None] * 5
        assert log == ["run 0", "run 1", "run 2"]
        assert _rows(engine, f"SELECT n FROM {effects}") == []
        assert _inbox(engine, tables, consumer.name) == set()
        log.clear()
        alone = [await processor.process(d) for d in deliveries]
    finally:
        await async_engine.dispose()
    assert [r.disposition for r in alone] == [
        Disposition.HANDLED,
        Disposition.HANDLED,
        Disposition.RETRYING,
        Disposition.HANDLED,
        Disposition.HANDLED,
    ]
    assert [r.attempts for r in alone] == [1, 1, 1, 1, 1]
    assert log == [
        *("run 0", "commit", "ack 0", "run 1", "commit", "ack 1", "run 2"),
        *("run 3", "commit", "ack 3", "run 4", "commit", "ack 4"),
    ]
    assert deliveries[2].settled == "retried"
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 1, 3, 4]
    assert _inbox(engine, tables, consumer.name) == {str(messages[n].id) for n in (0, 1, 3, 4)}


async def test_duplicates_in_and_before_a_batch_are_acknowledged_without_running_again(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    consumer = _batched(database_url, tables, "dups")
    log: list[str] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        await _write_effect(session, effects, message)

    earlier, fresh = Message.create("t", {"n": 0}), Message.create("t", {"n": 1})
    processor, async_engine = _processor(consumer, database_url)
    batches = BatchProcessor(processor)
    try:
        first = await batches.process(
            _deliveries(consumer, [earlier, Message.create("t", {"n": 9})], log)
        )
        assert [r.disposition for r in first if r] == [Disposition.HANDLED] * 2
        # Already handled, then a new one twice in the same batch.
        second = _deliveries(consumer, [earlier, fresh, fresh], log)
        results = await batches.process(second)
        assert [r.disposition if r else None for r in results] == [
            Disposition.DUPLICATE,
            Disposition.HANDLED,
            None,  # a second copy in one batch goes on alone, after the commit
        ]
        alone = await processor.process(second[2])
    finally:
        await async_engine.dispose()
    assert alone.disposition is Disposition.DUPLICATE
    assert [d.settled for d in second] == ["acked"] * 3
    ids = _rows(engine, f"SELECT message_id FROM {effects}")
    assert collections.Counter(ids)[str(earlier.id)] == 1
    assert collections.Counter(ids)[str(fresh.id)] == 1


async def test_failed_commit_leaves_the_whole_batch_unacknowledged_and_applies_nothing(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    """A deferred constraint breaks at COMMIT: nothing of the batch is acknowledged; each
    delivery then goes alone, and only the culprit fails."""
    checks = f'"{tables.schema}".checks'
    with engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {checks} (n int CONSTRAINT small CHECK (n < 100), "
                f"u int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
            )
        )
        connection.execute(text(f"INSERT INTO {checks} (n, u) VALUES (1, 7)"))
    consumer = _batched(database_url, tables, "commitfail")
    runs: list[int] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        n = message.payload["n"]
        runs.append(n)
        await _write_effect(session, effects, message)
        if n == 1:  # breaks the deferred unique constraint: only COMMIT finds out
            await session.execute(text(f"INSERT INTO {checks} (n, u) VALUES (2, 7)"))

    log: list[str] = []
    messages = [Message.create("t", {"n": n}) for n in range(3)]
    deliveries = _deliveries(consumer, messages, log)
    processor, async_engine = _processor(consumer, database_url)
    try:
        results = await BatchProcessor(processor).process(deliveries)
        assert results == [None, None, None]
        assert [d.settled for d in deliveries] == [None, None, None]
        assert _rows(engine, f"SELECT n FROM {effects}") == []
        assert _inbox(engine, tables, consumer.name) == set()
        alone = [await processor.process(d) for d in deliveries]
    finally:
        await async_engine.dispose()
    assert [r.disposition for r in alone] == [
        Disposition.HANDLED,
        Disposition.RETRYING,
        Disposition.HANDLED,
    ]
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 2]
    assert _inbox(engine, tables, consumer.name) == {str(messages[0].id), str(messages[2].id)}


async def test_handler_that_committed_then_failed_leaves_the_batch_to_one_by_one(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    """Its commit only flushed (a batch's handlers have no savepoints): it fails, the whole
    batch rolls back, and each message goes alone, where its failure undoes all of it."""
    consumer = _batched(database_url, tables, "selfcommit")
    failures = {1: 1}

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        await _write_effect(session, effects, message)
        await session.commit()
        n = message.payload["n"]
        if failures.get(n, 0) > 0:
            failures[n] -= 1
            raise RuntimeError("after the commit")

    log: list[str] = []
    messages = [Message.create("t", {"n": n}) for n in range(3)]
    deliveries = _deliveries(consumer, messages, log)
    processor, async_engine = _processor(consumer, database_url)
    try:
        assert await BatchProcessor(processor).process(deliveries) == [None, None, None]
        assert _rows(engine, f"SELECT n FROM {effects}") == []
        assert log == []
        alone = [await processor.process(d) for d in deliveries]
    finally:
        await async_engine.dispose()
    assert [r.disposition for r in alone] == [Disposition.HANDLED] * 3
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 1, 2]
    assert _inbox(engine, tables, consumer.name) == {str(m.id) for m in messages}


async def test_handler_rolling_back_its_session_sends_the_batch_one_by_one(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    """Its rollback ends the batch's transaction (nothing after it may commit in a new
    one): the batch goes one by one, where the rollback undoes only its own savepoint."""
    consumer = _batched(database_url, tables, "rollback")
    runs: list[int] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        n = message.payload["n"]
        runs.append(n)
        await _write_effect(session, effects, message)
        if n == 1:
            await session.rollback()

    log: list[str] = []
    messages = [Message.create("t", {"n": n}) for n in range(3)]
    deliveries = _deliveries(consumer, messages, log)
    processor, async_engine = _processor(consumer, database_url)
    try:
        assert await BatchProcessor(processor).process(deliveries) == [None] * 3
        assert runs == [0, 1]
        assert _rows(engine, f"SELECT n FROM {effects}") == []
        assert log == []
        alone = [await processor.process(d) for d in deliveries]
    finally:
        await async_engine.dispose()
    assert [r.disposition for r in alone] == [Disposition.HANDLED] * 3
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == [0, 2]
    assert _inbox(engine, tables, consumer.name) == {str(m.id) for m in messages}
    assert log == ["ack 0", "ack 1", "ack 2"]


async def test_lane_batch_keeps_order_past_a_failing_record_and_acks_after_commits(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    settings = settings_for(database_url, tables, consumer_batch_size=4, consumer_batch_linger=0.05)
    consumer = postroom.Consumer(unique("lanebatch"), settings)
    fails = {5: 1}

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        n = message.payload["n"]
        await _write_effect(session, effects, message)
        if fails.get(n, 0) > 0:
            fails[n] -= 1
            raise RuntimeError("once")

    log: list[tuple[Any, ...]] = []
    deliveries = [LaneDelivery(log, ("t", 0), offset) for offset in range(12)]
    service = ConsumerService(consumer, ScriptedSubscriber(deliveries), settings)
    commits: list[int] = []
    event.listen(service.processor.async_engine.sync_engine, "commit", lambda _c: commits.append(1))
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: len(log) >= 12, within=20, what="12 acks")
    finally:
        service.stop()
        await task
    assert log == [("ack", ("t", 0), offset) for offset in range(12)]
    # Each record's effect once, in partition order (the failed run rolled back).
    assert _rows(engine, f"SELECT n FROM {effects} ORDER BY seq") == list(range(12))
    assert len(commits) < 12, "records were not batched"


async def test_consumer_with_only_def_handlers_runs_them_side_by_side_unbatched(
    database_url: str, tables: Tables
) -> None:
    """Batches take ``async def`` handlers only; a consumer without any must not gather
    its ``def`` handlers' messages into batches handled one after another."""
    import threading
    import time

    settings = settings_for(
        database_url, tables, consumer_batch_size=BATCH, consumer_batch_linger=0.05
    )
    consumer = postroom.Consumer(unique("sync"), settings)
    lock = threading.Lock()
    running = [0]
    peak = [0]

    @consumer.handler("t")
    def handle(message: Message, session: Any) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1

    rig = Rig("memory")
    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    handled = service.metrics.handled.labels("t")
    async with rig.running(service, consumer.name):
        await rig.publish([Message.create("t", {"n": n}) for n in range(4)])
        await wait_until(lambda: handled._value.get() >= 4, within=20, what="4 handled")
    assert peak[0] >= 2, "the def handlers ran one after another"


def test_batch_settings_are_checked() -> None:
    from postroom.consumer.runner import check_settings

    with pytest.raises(ConfigurationError, match="POSTROOM_CONSUMER_BATCH_SIZE"):
        check_settings(postroom.Settings(consumer_batch_size=0))
    with pytest.raises(ConfigurationError, match="POSTROOM_CONSUMER_BATCH_LINGER"):
        check_settings(postroom.Settings(consumer_batch_linger=-1))
    with pytest.raises(ConfigurationError, match="at most 64, got 65"):
        check_settings(postroom.Settings(consumer_batch_size=65))
    check_settings(postroom.Settings(consumer_batch_size=64))


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
async def test_batched_consumer_handles_each_once_and_dead_letters_the_poison_alone(
    database_url: str, tables: Tables, engine: Engine, effects: str, broker: str
) -> None:
    (rabbitmq_available if broker == "rabbitmq" else kafka_available)()
    rig = Rig(broker)
    name = unique("batched")
    (topic,) = await rig.topics("orders", consumer=name)
    settings = settings_for(database_url, tables, consumer_batch_size=8)
    consumer = postroom.Consumer(name, settings)
    poison_runs: list[int] = []

    @consumer.handler(topic)
    async def handle(message: Message, session: AsyncSession) -> None:
        await _write_effect(session, effects, message)
        if message.payload["n"] == 13:
            poison_runs.append(1)
            raise RuntimeError("poison")

    messages = [Message.create(topic, {"n": n}, key=f"k{n % 3}") for n in range(40)]
    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        await rig.publish(messages)
        dead = service.metrics.dead_lettered.labels(topic)
        handled = service.metrics.handled.labels(topic)
        await wait_until(lambda: dead._value.get() >= 1, within=60, what="poison dead-lettered")
        await wait_until(lambda: handled._value.get() >= 39, within=60, what="39 handled")
        letters = await rig.dead_letters(name, 1)
    # Alone it spent its attempts; each batch it was in failed too, uncounted (a batch
    # holds it at most once per attempt: a retry comes back as a new delivery).
    max_attempts = settings.consumer_max_attempts
    assert max_attempts <= len(poison_runs) <= 2 * max_attempts
    assert letters[0][1]["postroom-error"] == "RuntimeError: poison"
    assert letters[0][1]["postroom-attempts"] == str(max_attempts)
    counts = collections.Counter(_rows(engine, f"SELECT n FROM {effects}"))
    assert counts == {n: 1 for n in range(40) if n != 13}
    poison = str(messages[13].id)
    assert _inbox(engine, tables, name) == {str(m.id) for m in messages} - {poison}


@pytest.mark.parametrize("taken", [2, 3], ids=["in-the-middle", "the-last-one"])
async def test_a_handler_swallowing_a_database_error_in_a_batch_fails_alone(
    database_url: str, tables: Tables, engine: Engine, effects: str, taken: int
) -> None:
    """Its caught error aborted the batch's transaction: the batch is rolled back, and
    alone the others (also those after it) commit and are acked while it is retried. The
    last handler of the batch too (no later statement fails: the check before the commit
    finds the aborted transaction)."""
    unique_n = f'"{tables.schema}".unique_n'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {unique_n} (n int PRIMARY KEY)"))
        connection.execute(text(f"INSERT INTO {unique_n} VALUES (:n)"), {"n": taken})
    consumer = _batched(database_url, tables, "swallow")
    log: list[str] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        await _write_effect(session, effects, message)
        with contextlib.suppress(IntegrityError):  # n == taken is in the table
            await session.execute(
                text(f"INSERT INTO {unique_n} VALUES (:n)"), {"n": message.payload["n"]}
            )

    messages = [Message.create("t", {"n": n}) for n in range(4)]
    deliveries = _deliveries(consumer, messages, log)
    processor, async_engine = _processor(consumer, database_url)
    try:
        assert await BatchProcessor(processor).process(deliveries) == [None] * 4
        assert _rows(engine, f"SELECT n FROM {effects}") == []
        alone = [await processor.process(d) for d in deliveries]
    finally:
        await async_engine.dispose()
    others = [n for n in range(4) if n != taken]
    assert [r.disposition for r in alone] == [
        Disposition.RETRYING if n == taken else Disposition.HANDLED for n in range(4)
    ]
    assert deliveries[taken].settled == "retried"
    assert sorted(_rows(engine, f"SELECT n FROM {effects}")) == others
    assert _inbox(engine, tables, consumer.name) == {str(messages[n].id) for n in others}
