"""A Kafka partition the subscriber paused (its prefetch was full) delivers again after a
rebalance gives it back: librdkafka keeps a partition's pause across a re-assignment, and
a subscriber that forgot it had paused it would wait on it for ever, in silence."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from postroom.brokers import subscriber_from_url
from postroom.brokers.kafka import KafkaSubscriber
from postroom.message import HEADER_ID, Message
from tests.support.consuming import KAFKA_GROUP_SETTINGS, publish
from tests.support.readback import create_topics
from tests.support.services import KAFKA_BOOTSTRAP, KAFKA_URL, kafka_available
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

PREFETCH = 2


async def test_a_paused_partition_delivers_again_after_a_rebalance_gives_it_back() -> None:
    kafka_available()
    topic = f"rebalance-{uuid.uuid4().hex[:8]}"
    group = f"rebalance-{uuid.uuid4().hex[:8]}"
    create_topics(KAFKA_BOOTSTRAP, [topic], partitions=1)
    messages = [Message.create(topic, {"n": n}, key="one") for n in range(6)]
    await publish(KAFKA_URL, messages)
    url = f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}"
    first = subscriber_from_url(url, prefetch=PREFETCH)
    assert isinstance(first, KafkaSubscriber)
    await first.start(group, [topic])
    taken: asyncio.Queue[str] = asyncio.Queue()

    async def pump() -> None:
        async for delivery in first.deliveries():
            await taken.put(delivery.headers[HEADER_ID])

    pumping = asyncio.create_task(pump())
    second = None
    try:
        # Two records handed out and never acknowledged: the partition is paused.
        handed = [await asyncio.wait_for(taken.get(), 40) for _ in range(PREFETCH)]
        assert handed == [str(m.id) for m in messages[:PREFETCH]]
        await wait_until(lambda: first._paused, within=10, what="the partition paused")
        epoch = first._epochs[(topic, 0)]
        # A second member joins and leaves: each rebalance revokes the partition from the
        # first member; the last one gives it back.
        second = subscriber_from_url(url, prefetch=PREFETCH)
        await second.start(group, [topic])
        await wait_until(
            lambda: first._epochs[(topic, 0)] >= epoch + 1,
            within=40,
            what="a rebalance after the second member joined",
        )
        await second.close()
        second = None
        await wait_until(
            lambda: (topic, 0) in first._assigned and first._epochs[(topic, 0)] >= epoch + 2,
            within=40,
            what="the partition given back to the first member",
        )
        # Nothing was committed: the partition starts again from its first record, and
        # goes on past the prefetch as records are acknowledged.
        again = await asyncio.wait_for(taken.get(), 30)
        assert again == str(messages[0].id)
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        if second is not None:
            await second.close()
        await first.close()
