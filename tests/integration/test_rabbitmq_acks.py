"""RabbitMQ acknowledgements several at once (``brokers/rabbitmq/acks.py``), on a real
broker: a multiple ack covers only settled deliveries, never one still unsettled before it,
and never names or covers a tag acknowledged alone (RabbitMQ would close the channel).

What is acknowledged is read back from RabbitMQ itself: the subscriber's connection is
closed, and what it had not acknowledged is ready in the queue again.
"""

from __future__ import annotations

import aio_pika
import pytest

from postroom.brokers.rabbitmq import RabbitMQSubscriber
from postroom.brokers.rabbitmq.subscriber import RabbitMQDelivery
from tests.support.consuming import unique
from tests.support.services import AMQP_URL, rabbitmq_available


async def _publish(queue: str, count: int) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        for number in range(count):
            await channel.default_exchange.publish(
                aio_pika.Message(str(number).encode(), message_id=f"m{number}"), routing_key=queue
            )


async def _ready(queue: str) -> list[str]:
    """The message ids ready in ``queue`` (taken and acknowledged), then deletes it."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, passive=True)
        ids: list[str] = []
        while (message := await declared.get(fail=False)) is not None:
            ids.append(str(message.message_id))
            await message.ack()
        await channel.queue_delete(queue)
        await channel.queue_delete(f"{queue}.dead-letter")
        return sorted(ids)


async def _deliveries(queue: str, count: int) -> tuple[RabbitMQSubscriber, list[RabbitMQDelivery]]:
    subscriber = RabbitMQSubscriber(AMQP_URL, prefetch=count)
    await subscriber.start(queue, [unique("acks-topic")])
    received: list[RabbitMQDelivery] = []
    async for delivery in subscriber.deliveries():
        received.append(delivery)
        if len(received) == count:
            break
    received.sort(key=lambda delivery: delivery._tag)
    return subscriber, received


@pytest.fixture
def queue() -> str:
    rabbitmq_available()
    return unique("acks")


async def test_a_multiple_ack_covers_the_settled_run_and_never_an_unsettled_delivery(
    queue: str,
) -> None:
    await _publish(queue, 8)
    subscriber, d = await _deliveries(queue, 8)
    channel = d[0]._incoming.channel
    frames: list[tuple[int, bool]] = []
    send = channel.basic_ack

    async def basic_ack(delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        frames.append((delivery_tag - d[0]._tag, multiple))
        await send(delivery_tag=delivery_tag, multiple=multiple, wait=wait)

    channel.basic_ack = basic_ack
    try:
        # 0-2: settled together, one frame. 3 stays unsettled; 4 and 6 are settled behind it
        # (acknowledged alone, at once); 5 is released; 7 is never settled.
        d[0].settle_for_later_ack()
        d[1].settle_for_later_ack()
        await d[2].ack()
        d[4].settle_for_later_ack()
        await d[6].ack()
        assert await d[5].release()
        assert not d[3]._window.holds(d[4]._tag)
        assert d[3]._window.holds(d[3]._tag)
        # Then 3 settles: its multiple ack must not fail on the tags acknowledged alone.
        await d[3].ack()
        assert not d[7]._channel_lost()
        # One frame for 0-2, one each for 6 and 4, one for 3 (covering nothing else).
        assert frames == [(2, True), (4, False), (6, False), (3, True)]
    finally:
        await subscriber.close()
    # 5 was requeued and 7 never acknowledged; everything else is gone from the queue.
    assert await _ready(queue) == ["m5", "m7"]


async def test_settled_deliveries_wait_for_no_unsettled_one_before_them(queue: str) -> None:
    """A delivery settled behind one still being handled is acknowledged straight away, so
    a slow handler does not hold the others (and the prefetch window) back."""
    await _publish(queue, 4)
    subscriber, d = await _deliveries(queue, 4)
    try:
        await d[1].ack()
        await d[3].ack()
        assert not any(d[0]._window.holds(delivery._tag) for delivery in (d[1], d[3]))
        # A copy's acknowledgement (retry or dead letter) goes alone too.
        await d[2].dead_letter("test", 1)
        assert not d[0]._channel_lost()
    finally:
        await subscriber.close()
    assert await _ready(queue) == ["m0"]
