"""What only the Kafka publisher promises, checked against Tansu (Kafka-compatible)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from postroom.brokers import CONFIRMED, Outcome
from postroom.brokers.kafka import KafkaPublisher
from postroom.errors import BrokerUnavailableError
from postroom.message import Message
from tests.contract.harness import KafkaHarness, assert_arrived_as_written, make_batch
from tests.support.network import free_port
from tests.support.processes import TansuBroker


@pytest.fixture
def kafka(kafka: str) -> KafkaHarness:
    """The shared Kafka broker (once the session's ``kafka`` fixture found it answering)."""
    return KafkaHarness()


@pytest.fixture
async def private_kafka(tansu: str) -> AsyncIterator[TansuBroker]:
    """A Tansu broker of this test's own, to kill and restart."""
    broker = TansuBroker(tansu)
    await asyncio.to_thread(broker.start)
    yield broker
    broker.kill()


async def test_records_carry_key_timestamp_and_headers(kafka: KafkaHarness) -> None:
    topic = await kafka.new_topic()
    keyed = Message.create(topic, {"n": 1}, key="order-7", headers={"trace-id": "t-1"})
    keyless = Message.create(topic, b"\x01\x02")
    publisher = kafka.make_publisher()

    assert await publisher.publish([keyed, keyless]) == [CONFIRMED] * 2
    await publisher.close()

    got = {r.id: r for r in await kafka.read_back(topic, 2)}
    assert got[str(keyed.id)].key == "order-7"
    assert got[str(keyless.id)].key is None
    for message in (keyed, keyless):
        kind, millis = got[str(message.id)].extra["timestamp"]
        assert millis == int(message.created_at.timestamp() * 1000)
        assert kind == 1  # TIMESTAMP_CREATE_TIME
    assert got[str(keyed.id)].headers["trace-id"] == "t-1"


async def test_a_key_stays_on_one_partition(kafka: KafkaHarness) -> None:
    topic = await kafka.new_topic()
    batch = [Message.create(topic, {"i": i}, key=f"key-{i % 10}") for i in range(100)]
    publisher = kafka.make_publisher()

    assert await publisher.publish(batch) == [CONFIRMED] * 100
    await publisher.close()

    received = await kafka.read_back(topic, 100)
    partitions: dict[str | None, set[int]] = {}
    for record in received:
        partitions.setdefault(record.key, set()).add(record.extra["partition"])
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1, "all keys on one partition"
    assert_arrived_as_written(batch, received)


async def test_a_full_producer_queue_waits_instead_of_failing(kafka: KafkaHarness) -> None:
    topic = await kafka.new_topic()
    batch = make_batch(topic, 300)
    publisher = kafka.make_publisher(config={"queue.buffering.max.messages": 20})

    assert await publisher.publish(batch) == [CONFIRMED] * 300
    await publisher.close()

    assert_arrived_as_written(batch, await kafka.read_back(topic, 300))


async def test_message_over_message_max_bytes_is_rejected_alone(kafka: KafkaHarness) -> None:
    topic = await kafka.new_topic()
    small = make_batch(topic, 4)
    big = Message.create(topic, b"x" * 5_000, key=small[0].key)
    publisher = kafka.make_publisher(config={"message.max.bytes": 4_000})

    results = await publisher.publish([small[0], big, *small[1:]])
    await publisher.close()

    assert results[1].outcome is Outcome.REJECTED
    assert results[1].error is not None
    assert "too large" in results[1].error
    assert [results[0], *results[2:]] == [CONFIRMED] * 4
    assert_arrived_as_written(small, await kafka.read_back(topic, 4))


async def test_connect_error_names_the_brokers() -> None:
    port = free_port()
    publisher = KafkaPublisher(f"127.0.0.1:{port}", connect_timeout=3)

    with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}"):
        await publisher.connect()


async def test_broker_restart_recovers_with_a_new_producer(private_kafka: TansuBroker) -> None:
    """Tansu forgets producer ids on restart: the idempotent producer fails fatally
    (UNKNOWN_PRODUCER_ID); that must be UNAVAILABLE, and the next publish must work."""
    harness = KafkaHarness(
        private_kafka.url,
        message_timeout_ms=2000,
        config={"reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 250},
    )
    publisher = harness.make_publisher()
    await publisher.connect()
    topic = await harness.new_topic()
    assert await publisher.publish(make_batch(topic, 5, tag="a")) == [CONFIRMED] * 5

    private_kafka.kill()
    await asyncio.to_thread(private_kafka.start)

    after = make_batch(topic, 5, tag="b")
    attempts = []
    for _ in range(4):
        results = await publisher.publish(after)
        attempts.append(results)
        if results == [CONFIRMED] * 5:
            break
    await publisher.close()

    assert attempts[-1] == [CONFIRMED] * 5, attempts
    assert all(r.outcome is Outcome.UNAVAILABLE for rs in attempts[:-1] for r in rs), attempts
    assert len(attempts) <= 3
    assert_arrived_as_written(after, await harness.read_back(topic, 5))
