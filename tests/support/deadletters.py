"""Dead letters put straight onto a real broker, as a consumer would have left them.

:func:`rabbitmq_dead_letter` publishes to the queue ``<consumer>.dead-letter`` (declaring it
and the consumer's own queue, which requeue sends to) a message with the AMQP properties and
headers a test chooses, so it can stand for another producer's message; :func:`kafka_dead_letter`
produces a postroom message to the topic ``<consumer>.dead-letter``. Both carry the headers a
consumer adds when it dead-letters (error, attempts, original topic, consumer, time).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from postroom.brokers import publisher_from_url
from postroom.brokers.base import (
    HEADER_ATTEMPTS,
    HEADER_CONSUMER,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_TOPIC,
    dead_letter_name,
)
from postroom.message import HEADER_ID, JSON, Message


def _reason(consumer: str, topic: str) -> dict[str, str]:
    return {
        HEADER_TOPIC: topic,
        HEADER_ERROR: "RuntimeError: the payment service said no",
        HEADER_ATTEMPTS: "1",
        HEADER_CONSUMER: consumer,
        HEADER_DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
    }


async def rabbitmq_dead_letter(
    amqp_url: str,
    consumer: str,
    *,
    message_id: str | None,
    postroom_id: str | None,
    topic: str = "orders.placed",
) -> None:
    """Publish one dead letter (confirmed) with these ids to ``<consumer>.dead-letter``."""
    import aio_pika

    headers = _reason(consumer, topic)
    if postroom_id is not None:
        headers[HEADER_ID] = postroom_id
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(consumer, durable=True)
        await channel.declare_queue(dead_letter_name(consumer), durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                b'{"order":17}',
                headers=dict(headers),
                content_type=JSON,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=dead_letter_name(consumer),
            mandatory=True,
        )
    finally:
        await connection.close()


async def kafka_dead_letter(kafka_url: str, consumer: str, original: Message) -> None:
    """Produce ``original`` (confirmed) to the topic ``<consumer>.dead-letter`` as a consumer
    dead-letters it: its postroom headers plus the reason."""
    letter = dataclasses.replace(
        original,
        topic=dead_letter_name(consumer),
        headers={**original.headers, **_reason(consumer, original.topic)},
    )
    publisher = publisher_from_url(kafka_url)
    try:
        await publisher.connect()
        [result] = await publisher.publish([letter])
        assert result.confirmed, result.error
    finally:
        await publisher.close()
