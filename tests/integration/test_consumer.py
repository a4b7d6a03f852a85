"""The consumer against real PostgreSQL and each broker: once per message, retries, dead letters.

Every test runs a :class:`ConsumerService` in-process on a broker (memory, RabbitMQ, Kafka)
and checks what it did in the database and on the broker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

import postroom
from postroom.backoff import Backoff
from postroom.brokers.memory import MemoryBroker, MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.message import Message
from postroom.schema import Tables
from tests.support.consuming import Rig, running, settings_for, unique
from tests.support.database import count
from tests.support.readback import read_kafka
from tests.support.services import KAFKA_BOOTSTRAP, kafka_available, rabbitmq_available
from tests.support.waiting import stays_false, wait_until

BROKERS = ["memory", "rabbitmq", "kafka"]


@pytest.fixture(params=BROKERS)
async def rig(request: pytest.FixtureRequest) -> Rig:
    if request.param == "rabbitmq":
        rabbitmq_available()
    elif request.param == "kafka":
        kafka_available()
    return Rig(request.param)


@pytest.fixture
def effects(engine: Engine, tables: Tables) -> str:
    """A business table in the test's schema: one row per handler run that committed."""
    name = f'"{tables.schema}".effects'
    with engine.begin() as connection:
        connection.execute(
            text(f"CREATE TABLE {name} (seq bigserial, message_id text, topic text, note text)")
        )
    return name


# ----------------------------------------------------------------------------- (1)


async def test_five_deliveries_change_the_business_table_once(
    rig: Rig, database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    name = unique("once")
    (topic,) = await rig.topics("orders", consumer=name)
    settings = settings_for(database_url, tables)
    consumer = postroom.Consumer(name, settings)

    @consumer.handler(topic)
    async def record(message: postroom.Message, session: AsyncSession) -> None:
        await session.execute(
            text(f"INSERT INTO {effects} (message_id, topic) VALUES (:id, :topic)"),
            {"id": str(message.id), "topic": message.topic},
        )

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        message = Message.create(topic, {"order": 1}, key="order-1")
        await rig.publish([message] * 5)
        duplicates = service.metrics.duplicates.labels(topic)
        await wait_until(lambda: duplicates._value.get() >= 4, what="four duplicates counted")
    assert count(engine, f"SELECT count(*) FROM {effects}") == 1
    inbox = f'"{tables.schema}".inbox'
    rows = count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name)
    assert rows == 1
    assert service.metrics.handled.labels(topic)._value.get() == 1
    assert service.metrics.duplicates.labels(topic)._value.get() == 4


# ----------------------------------------------------------------------------- (3)


async def test_always_failing_handler_is_retried_with_growing_delays_then_dead_lettered(
    rig: Rig, database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    name = unique("fails")
    bad_topic, good_topic = await rig.topics("bad", "good", consumer=name)
    settings = settings_for(
        database_url,
        tables,
        consumer_max_attempts=4,
        consumer_backoff_initial=0.2,
        consumer_backoff_max=0.8,
    )
    backoff = Backoff(settings.consumer_backoff_initial, settings.consumer_backoff_max)
    consumer = postroom.Consumer(name, settings)
    attempts: list[float] = []
    good_done_at: list[float] = []

    @consumer.handler(bad_topic)
    async def always_fails(message: postroom.Message, session: AsyncSession) -> None:
        attempts.append(time.monotonic())
        await session.execute(text(f"INSERT INTO {effects} (note) VALUES ('bad')"))
        raise RuntimeError("the payment service said no")

    @consumer.handler(good_topic)
    def works(message: postroom.Message, session: Any) -> None:
        session.execute(text(f"INSERT INTO {effects} (note) VALUES ('good')"))
        good_done_at.append(time.monotonic())

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        bad = Message.create(bad_topic, {"order": "poison"})
        await rig.publish([bad])
        await wait_until(lambda: len(attempts) >= 1, what="first attempt")
        await rig.publish([Message.create(good_topic, {"n": n}) for n in range(3)])
        dead = service.metrics.dead_lettered.labels(bad_topic)
        await wait_until(lambda: dead._value.get() >= 1, what="dead-lettered")
        await wait_until(lambda: len(good_done_at) == 3, what="good messages handled")
        letters = await rig.dead_letters(name, 1)
        # No further attempt after the dead letter: watch until a retry after the last
        # attempt would have come (its whole nominal delay, and the redelivery's latency).
        retry_due = attempts[-1] + backoff.nominal(settings.consumer_max_attempts) + 0.5
        await stays_false(
            lambda: len(attempts) > settings.consumer_max_attempts,
            during=max(0.0, retry_due - time.monotonic()),
            what="an attempt after the dead letter",
        )
    assert len(attempts) == 4
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for attempt, gap in enumerate(gaps, start=1):
        # RabbitMQ's per-message expiry counts whole milliseconds: 20 ms of tolerance.
        planned = backoff.nominal(attempt)
        assert planned / 2 - 0.02 <= gap <= planned + 1.0, (attempt, gaps)
    # Growth, measured against the plan: the third wait is longer than the first could
    # ever be (the first failure also pays one-time costs, such as its first traceback).
    assert gaps[2] > backoff.nominal(1), gaps
    # The good messages were handled while the bad one was still being retried.
    assert min(good_done_at) < attempts[-1]
    body, headers = letters[0]
    assert json.loads(body) == {"order": "poison"}
    assert headers["postroom-attempts"] == "4"
    assert "RuntimeError: the payment service said no" in headers["postroom-error"]
    assert headers["postroom-topic"] == bad_topic
    assert headers["postroom-consumer"] == name
    # Only the good handler's writes committed; the failed runs rolled back.
    assert count(engine, f"SELECT count(*) FROM {effects} WHERE note = 'bad'") == 0
    assert count(engine, f"SELECT count(*) FROM {effects} WHERE note = 'good'") == 3
    inbox = f'"{tables.schema}".inbox'
    assert count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name) == 3


# ----------------------------------------------------------------------------- (6)


@pytest.mark.parametrize("rig", ["rabbitmq", "kafka"], indirect=True)
async def test_messages_without_id_or_with_bad_json_are_dead_lettered_with_the_reason(
    rig: Rig, database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    # The memory broker's case is in test_consumer_testing.py (through postroom.testing).
    name = unique("undecodable")
    (topic,) = await rig.topics("raw", consumer=name)
    settings = settings_for(database_url, tables)
    consumer = postroom.Consumer(name, settings)
    handled: list[Any] = []

    @consumer.handler(topic)
    async def record(message: postroom.Message, session: AsyncSession) -> None:
        handled.append(message.payload)

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        await rig.publish_raw(topic, b'{"no": "id"}', {}, "application/json")
        good_id = str(uuid.uuid4())
        bad_json = b'{"broken": '
        await rig.publish_raw(topic, bad_json, {"postroom-id": good_id}, "application/json")
        await rig.publish_raw(
            topic, b'{"ok": 1}', {"postroom-id": str(uuid.uuid4())}, "application/json"
        )
        dead = service.metrics.dead_lettered.labels(topic)
        await wait_until(lambda: dead._value.get() >= 2 and len(handled) == 1, what="outcomes")
        letters = await rig.dead_letters(name, 2)
    assert handled == [{"ok": 1}]
    reasons = sorted(headers["postroom-error"] for _, headers in letters)
    assert any("has no id" in r for r in reasons), reasons
    assert any("not valid application/json" in r for r in reasons), reasons
    assert all(headers["postroom-attempts"] == "1" for _, headers in letters)
    assert bad_json in [body for body, _ in letters]
    inbox = f'"{tables.schema}".inbox'
    assert count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name) == 1


# ----------------------------------------------------------------------------- (4)


async def test_kafka_keeps_partition_order_and_never_commits_past_an_unhandled_record(
    database_url: str, tables: Tables, engine: Engine, effects: str
) -> None:
    kafka_available()
    from confluent_kafka import Consumer as KafkaConsumer
    from confluent_kafka import TopicPartition

    rig = Rig("kafka")
    name = unique("ordered")
    (topic,) = await rig.topics("orders", consumer=name)
    settings = settings_for(
        database_url,
        tables,
        consumer_max_attempts=5,
        consumer_backoff_initial=0.4,
        consumer_backoff_max=0.8,
        consumer_prefetch=4,  # small: exercise pause and resume of a held-back partition
        # The backoff between attempts is timed below; in a batch, a failed run is first
        # re-run alone at once, uncounted (test_consumer_batch covers lanes in batches).
        consumer_batch_size=1,
    )
    consumer = postroom.Consumer(name, settings)
    messages = [
        Message.create(topic, {"key": f"k{n % 8}", "seq": n // 8}, key=f"k{n % 8}")
        for n in range(64)
    ]
    poison = messages[3 * 8 + 3]  # key k3, its 4th message: fails twice, then works
    poison_runs: list[float] = []

    @consumer.handler(topic)
    async def record(message: postroom.Message, session: AsyncSession) -> None:
        payload = message.payload
        if message.id == poison.id:
            poison_runs.append(time.monotonic())
            if len(poison_runs) < 3:
                raise RuntimeError("not yet")
        await session.execute(
            text(f"INSERT INTO {effects} (message_id, note) VALUES (:id, :note)"),
            {"id": str(message.id), "note": f"{payload['key']}:{payload['seq']}"},
        )

    await rig.publish(messages)
    placed = await read_kafka(KAFKA_BOOTSTRAP, topic, len(messages))
    where = {r.id: (r.extra["partition"], r.extra["offset"]) for r in placed}
    poison_partition, poison_offset = where[str(poison.id)]
    ends: dict[int, int] = {}
    for partition, offset in where.values():
        ends[partition] = max(ends.get(partition, 0), offset + 1)

    watcher = KafkaConsumer({"bootstrap.servers": KAFKA_BOOTSTRAP, "group.id": name})

    def committed() -> dict[int, int]:
        parts = watcher.committed([TopicPartition(topic, p) for p in ends], timeout=5)
        return {tp.partition: tp.offset for tp in parts}

    samples: list[dict[int, int]] = []
    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with running(service, cleanup=lambda: asyncio.to_thread(watcher.close)):
        await wait_until(lambda: len(poison_runs) >= 1, what="the poison's first run")
        while len(poison_runs) < 3:
            samples.append(await asyncio.to_thread(committed))
            await asyncio.sleep(0.1)
        handled = f"SELECT count(*) FROM {effects}"
        await wait_until(lambda: count(engine, handled) == len(messages), what="all handled")

        async def all_committed() -> bool:
            return await asyncio.to_thread(committed) == ends

        await wait_until(
            all_committed,
            within=15,
            interval=0.2,
            what="every partition committed to its end",
            detail=lambda: repr((committed(), ends)),
        )
    # While the poison was failing, its partition's committed offset stayed at or before it.
    assert samples
    for sample in samples:
        assert sample.get(poison_partition, -1001) <= poison_offset, (sample, poison_offset)
    # Other partitions moved on meanwhile.
    first, last = samples[0], samples[-1]
    assert any(
        last.get(p, -1) > first.get(p, -1) or last.get(p, -1) == end
        for p, end in ends.items()
        if p != poison_partition
    ), (samples, ends, poison_partition)
    # Each key's messages were handled in order, once.
    with engine.connect() as connection:
        notes = [
            row[0] for row in connection.execute(text(f"SELECT note FROM {effects} ORDER BY seq"))
        ]
    assert len(notes) == len(set(notes)) == len(messages)
    for key in {f"k{n}" for n in range(8)}:
        seqs = [int(note.split(":")[1]) for note in notes if note.split(":")[0] == key]
        assert seqs == sorted(seqs) == list(range(8)), (key, seqs)
    gaps = [b - a for a, b in itertools.pairwise(poison_runs)]
    assert gaps[0] >= 0.19, gaps
    assert gaps[1] > gaps[0] * 0.9, gaps


# ----------------------------------------------------------------------------- retention


async def test_inbox_retention_purges_old_rows_of_this_consumer_and_warns_when_too_short(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    from structlog.testing import capture_logs

    inbox = f'"{tables.schema}".inbox'
    with engine.begin() as connection:
        connection.execute(
            text(
                f"INSERT INTO {inbox} (consumer, message_id, processed_at) "
                "SELECT c, 'm' || n, now() - interval '2 hours' "
                "FROM generate_series(1, 50) AS n, (VALUES ('keeper'), ('other')) AS v(c)"
            )
        )
        connection.execute(
            text(f"INSERT INTO {inbox} (consumer, message_id) VALUES ('keeper', 'new')")
        )
    settings = settings_for(
        database_url,
        tables,
        inbox_retention=3600.0,
        consumer_backoff_max=7200.0,
        consumer_backoff_initial=600.0,
        consumer_max_attempts=5,
    )
    consumer = postroom.Consumer("keeper", settings)
    consumer.handler("anything")(lambda message, session: None)
    service = ConsumerService(consumer, MemorySubscriber(MemoryBroker()), settings)
    with capture_logs() as logs:
        async with running(service):
            await wait_until(
                lambda: service.metrics.inbox_purged._value.get() >= 50, what="the purge"
            )
    kept = count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = 'keeper'")
    others = count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = 'other'")
    assert (kept, others) == (1, 50)
    warnings = [e for e in logs if e["event"] == "consumer.retention_too_short"]
    assert warnings
    assert warnings[0]["retry_window"] == 600 + 1200 + 2400 + 4800
