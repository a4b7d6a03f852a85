"""RabbitMQ retry queues expire when unused, and queues from before that keep working."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from structlog.testing import capture_logs

from postroom.brokers.rabbitmq.topology import (
    retry_queue_expires_ms,
    retry_queue_name,
    retry_tier_ms,
)
from postroom.message import Message
from tests.contract.harness import RETRY_DELAY, RabbitMQHarness
from tests.contract.subscribing import ids, subscribed
from tests.support.consuming import unique
from tests.support.services import AMQP_URL


@contextlib.asynccontextmanager
async def own_channel() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel on a connection of its own (a refused declaration closes only it)."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        yield await connection.channel()


async def declare(name: str, arguments: dict[str, Any]) -> None:
    """Declare a durable queue ``name`` with ``arguments``."""
    async with own_channel() as channel:
        await channel.declare_queue(name, durable=True, arguments=arguments)


async def delete(name: str) -> None:
    """Delete queue ``name``."""
    async with own_channel() as channel:
        await channel.queue_delete(name)


def expected_arguments(consumer: str, tier: int) -> dict[str, object]:
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": consumer,
        "x-message-ttl": tier,
        "x-expires": retry_queue_expires_ms(tier),
    }


async def test_retry_queues_are_declared_with_an_expiry(rabbit: RabbitMQHarness) -> None:
    topic = await rabbit.new_topic()
    consumer = unique("contract-expiry")
    message = Message.create(topic, {"retry": True})
    queue = retry_queue_name(consumer, RETRY_DELAY)
    tier = retry_tier_ms(RETRY_DELAY)
    try:
        async with subscribed(rabbit, consumer, [topic]) as taken:
            (first,) = await taken.receive([message])
            await first.retry_later(RETRY_DELAY, "not yet")
            (again,) = await taken.take(1)
            await again.ack()
        assert retry_queue_expires_ms(tier) >= 24 * 3600 * 1000
        # The same arguments are accepted; without x-expires RabbitMQ refuses: it has it.
        await declare(queue, expected_arguments(consumer, tier))
        without = {k: v for k, v in expected_arguments(consumer, tier).items() if k != "x-expires"}
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await declare(queue, without)
    finally:
        await delete(queue)


async def test_an_old_retry_queue_without_expiry_is_used_and_reported(
    rabbit: RabbitMQHarness,
) -> None:
    topic = await rabbit.new_topic()
    consumer = unique("contract-legacy")
    queue = retry_queue_name(consumer, RETRY_DELAY)
    tier = retry_tier_ms(RETRY_DELAY)
    legacy = {k: v for k, v in expected_arguments(consumer, tier).items() if k != "x-expires"}
    await declare(queue, legacy)
    message = Message.create(topic, {"retry": "legacy"})
    try:
        with capture_logs() as logs:
            async with subscribed(rabbit, consumer, [topic]) as taken:
                (first,) = await taken.receive([message])
                await first.retry_later(RETRY_DELAY, "not yet")
                (again,) = await taken.take(1)
                assert ids([again]) == [str(message.id)]
                assert again.attempt == first.attempt + 1
                await again.ack()
                # The consuming channel survived the refused declaration.
                second = Message.create(topic, {"after": True})
                assert ids(await taken.receive([second])) == [str(second.id)]
        warnings = [e for e in logs if e["event"] == "retry queue declared without expiry"]
        assert len(warnings) == 1
        assert "delete it once it is empty" in warnings[0]["action"]
    finally:
        await delete(queue)
