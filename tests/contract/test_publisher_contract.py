"""The Publisher contract, run unchanged against memory, RabbitMQ and Kafka."""

from __future__ import annotations

import asyncio
import time

import pytest

from postroom.brokers import CONFIRMED, Outcome, Publisher, PublishResult
from postroom.errors import BrokerUnavailableError
from postroom.message import Message
from tests.contract.harness import Harness, Outage, assert_arrived_as_written, make_batch


async def test_batch_arrives_exactly_as_written(broker: Harness, publisher: Publisher) -> None:
    topic = await broker.new_topic()
    batch = make_batch(topic, 200)

    results = await publisher.publish(batch)

    assert results == [CONFIRMED] * len(batch)
    assert_arrived_as_written(batch, await broker.read_back(topic, len(batch)))


async def test_poison_is_rejected_and_the_rest_confirmed(
    broker: Harness, publisher: Publisher
) -> None:
    topic = await broker.new_topic()
    good = make_batch(topic, 20)
    poisons = [await broker.poison(topic) for _ in range(3)]
    batch = [poisons[0], *good[:10], poisons[1], *good[10:], poisons[2]]

    results = await publisher.publish(batch)

    assert len(results) == len(batch)
    for message, result in zip(batch, results, strict=True):
        if message in poisons:
            assert result.outcome is Outcome.REJECTED
            assert result.error is not None
            assert len(result.error) > 30, result.error
        else:
            assert result == CONFIRMED
    assert_arrived_as_written(good, await broker.read_back(topic, len(good)))


async def test_oversized_messages_are_refused_unsent_and_the_rest_confirmed(
    broker: Harness, publisher: Publisher
) -> None:
    """A header too big for one frame / the record limit, and a body over every default
    limit, are refused for good before sending; the others go out, the connection stays."""
    topic = await broker.new_topic()
    good = make_batch(topic, 6)
    big_header = Message.create(topic, {"n": 1}, key="big", headers={"blob": "h" * 2_000_000})
    big_body = Message.create(
        topic, b"b" * (17 * 1024 * 1024), key="big-body", max_payload_bytes=32 * 1024 * 1024
    )
    batch = [good[0], big_header, *good[1:3], big_body, *good[3:]]

    results = await publisher.publish(batch)

    for message, result in zip(batch, results, strict=True):
        if message in (big_header, big_body):
            assert result.outcome is Outcome.REJECTED
            assert result.permanent
            assert result.error is not None
            assert "too large for the broker" in result.error
            assert "raise" in result.error
        else:
            assert result == CONFIRMED
    after = make_batch(topic, 5, tag="after")
    assert await publisher.publish(after) == [CONFIRMED] * 5
    sent = good + after
    assert_arrived_as_written(sent, await broker.read_back(topic, len(sent)))


async def test_connect_to_nothing_raises_quickly(broker: Harness) -> None:
    publisher = broker.unreachable_publisher()
    started = time.monotonic()

    with pytest.raises(BrokerUnavailableError) as raised:
        await publisher.connect()

    assert time.monotonic() - started < 5
    assert "s3cret-pw" not in str(raised.value)
    results = await publisher.publish(make_batch("orders", 3))
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 3
    assert all(r.error for r in results)
    await publisher.close()


async def test_publish_after_close_and_reconnect(broker: Harness) -> None:
    topic = await broker.new_topic()
    first, second, third = (make_batch(topic, 15, tag=t) for t in "abc")
    publisher = broker.make_publisher()

    await publisher.connect()
    assert await publisher.publish(first) == [CONFIRMED] * 15
    await publisher.close()
    assert await publisher.publish(second) == [CONFIRMED] * 15
    await publisher.close()
    await publisher.connect()
    assert await publisher.publish(third) == [CONFIRMED] * 15
    await publisher.close()
    await publisher.close()

    sent = first + second + third
    assert_arrived_as_written(sent, await broker.read_back(topic, len(sent)))


async def test_empty_batch_returns_empty_list(broker: Harness, publisher: Publisher) -> None:
    assert await publisher.publish([]) == []
    assert await broker.make_publisher().publish([]) == []
    assert await broker.unreachable_publisher().publish([]) == []


async def test_concurrent_batches_are_all_confirmed(broker: Harness, publisher: Publisher) -> None:
    topic = await broker.new_topic()
    batches = [make_batch(topic, 40, tag=t) for t in "xyz"]

    results = await asyncio.gather(*(publisher.publish(b) for b in batches))

    assert results == [[CONFIRMED] * 40] * 3
    received = await broker.read_back(topic, 120)
    assert {r.id for r in received} == {str(m.id) for b in batches for m in b}
    for batch in batches:
        ids = {str(m.id) for m in batch}
        assert_arrived_as_written(batch, [r for r in received if r.id in ids])


async def publish_until_confirmed(
    publisher: Publisher, batch: list[Message], *, seconds: float
) -> list[PublishResult]:
    """Publish again what was not confirmed, as a relay would; every result seen."""
    seen: list[PublishResult] = []
    pending = batch
    deadline = time.monotonic() + seconds
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} messages still not confirmed"
        results = await publisher.publish(pending)
        seen.extend(results)
        pending = [m for m, r in zip(pending, results, strict=True) if not r.confirmed]
        if pending:
            await asyncio.sleep(0.2)
    return seen


async def test_outage_is_unavailable_then_publishing_recovers(outage: Outage) -> None:
    broker = outage.harness
    topic = await broker.new_topic()
    before, during = make_batch(topic, 20, tag="b"), make_batch(topic, 20, tag="d")
    publisher = broker.make_publisher()
    await publisher.connect()
    assert await publisher.publish(before) == [CONFIRMED] * 20

    await outage.cut()
    results = await publisher.publish(during)
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 20
    assert all(r.error for r in results)
    with pytest.raises(BrokerUnavailableError):
        await broker.make_publisher().connect()

    await outage.restore()
    retried = await publish_until_confirmed(publisher, during, seconds=20)
    assert all(r.outcome is not Outcome.REJECTED for r in retried)
    await publisher.close()

    sent = before + during if outage.keeps_messages else during
    assert_arrived_as_written(sent, await broker.read_back(topic, len(sent)))
