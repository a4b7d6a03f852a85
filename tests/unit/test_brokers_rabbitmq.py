"""RabbitMQ publisher behaviour that needs no broker."""

from __future__ import annotations

from postroom.brokers import Outcome
from postroom.brokers.base import wire_size
from postroom.brokers.rabbitmq import RabbitMQPublisher, _broker_size_limit
from postroom.message import Message


def test_broker_size_limit_is_read_from_the_channel_close_reason() -> None:
    reason = Exception(
        406,
        "PRECONDITION_FAILED - message size 20000000 is larger than configured max size 16777216",
    )
    assert _broker_size_limit(reason) == 16_777_216
    assert _broker_size_limit(Exception("NOT_FOUND - no exchange 'x'")) is None


async def test_oversized_message_is_rejected_even_without_a_broker() -> None:
    small = Message.create("orders", b"x")
    limit = wire_size(small)
    publisher = RabbitMQPublisher("amqp://guest:guest@127.0.0.1:1/", max_message_bytes=limit)
    big = Message.create("orders", b"x" * 2)

    only_big = await publisher.publish([big])
    mixed = await publisher.publish([small, big])
    await publisher.close()

    assert only_big[0].outcome is Outcome.REJECTED
    assert only_big[0].permanent
    assert f"{wire_size(big)} bytes > limit {limit}" in (only_big[0].error or "")
    assert [r.outcome for r in mixed] == [Outcome.UNAVAILABLE, Outcome.REJECTED]
    assert "127.0.0.1:1" in (mixed[0].error or "")
