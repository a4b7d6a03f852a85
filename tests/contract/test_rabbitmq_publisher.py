"""What only the RabbitMQ publisher promises, checked against the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aio_pika
import pytest

from postroom.brokers import CONFIRMED, Outcome
from postroom.brokers.base import wire_size
from postroom.brokers.rabbitmq import RabbitMQPublisher
from postroom.errors import BrokerUnavailableError
from postroom.message import Message
from tests.contract.harness import (
    RabbitMQHarness,
    assert_arrived_as_written,
    make_batch,
)
from tests.support.consuming import unique
from tests.support.network import address, replace_address
from tests.support.proxy import FaultProxy
from tests.support.services import AMQP_URL


@pytest.fixture
def proxy(rabbitmq: str) -> Iterator[FaultProxy]:
    """A cuttable TCP proxy in front of RabbitMQ."""
    with FaultProxy(*address(AMQP_URL, 5672)) as proxy:
        yield proxy


async def test_messages_are_persistent_with_amqp_properties(rabbit: RabbitMQHarness) -> None:
    topic = await rabbit.new_topic()
    message = Message.create(topic, {"a": 1}, key="k-1", headers={"trace-id": "t"})
    publisher = rabbit.make_publisher()

    assert await publisher.publish([message]) == [CONFIRMED]
    await publisher.close()

    [got] = await rabbit.read_back(topic, 1)
    assert got.id == str(message.id)
    assert got.topic == topic
    assert got.extra["exchange"] == rabbit.exchange
    assert got.extra["delivery_mode"] == aio_pika.DeliveryMode.PERSISTENT
    assert got.extra["timestamp"] == message.created_at.replace(microsecond=0)


async def test_unroutable_error_names_exchange_and_routing_key(rabbit: RabbitMQHarness) -> None:
    publisher = rabbit.make_publisher()
    lost = Message.create(unique("nobody.listens"), {"a": 1})

    [result] = await publisher.publish([lost])
    await publisher.close()

    assert result.outcome is Outcome.REJECTED
    assert result.error is not None
    assert "unroutable" in result.error
    assert repr(rabbit.exchange) in result.error
    assert repr(lost.topic) in result.error


async def test_oversized_message_is_rejected_unsent(rabbit: RabbitMQHarness) -> None:
    topic = await rabbit.new_topic()
    small = make_batch(topic, 4)
    big = Message.create(topic, b"x" * 5_000)
    publisher = rabbit.make_publisher(max_message_bytes=4_000)

    results = await publisher.publish([small[0], small[1], big, small[2], small[3]])
    await publisher.close()

    assert results[2].outcome is Outcome.REJECTED
    assert results[2].error is not None
    assert results[2].permanent
    assert f"{wire_size(big)} bytes > limit 4000" in results[2].error
    assert [results[i] for i in (0, 1, 3, 4)] == [CONFIRMED] * 4
    assert_arrived_as_written(small, await rabbit.read_back(topic, 4))


async def test_header_over_frame_max_is_refused_without_losing_the_connection(
    rabbit: RabbitMQHarness,
) -> None:
    """RabbitMQ closes the connection on a header frame over frame_max: never send one."""
    topic = await rabbit.new_topic()
    small = make_batch(topic, 4)
    big = Message.create(topic, {"n": 1}, key="k", headers={"blob": "h" * 200_000})
    publisher = rabbit.make_publisher()
    lost: list[object] = []
    await publisher.connect()
    connection = publisher._connection  # type: ignore[attr-defined]
    connection.close_callbacks.add(lambda *args: lost.append(args))

    results = await publisher.publish([small[0], big, *small[1:]])
    later = make_batch(topic, 2, tag="again")
    again = await publisher.publish(later)
    still_open = publisher._connection is connection and not lost  # type: ignore[attr-defined]
    await publisher.close()

    assert results[1].outcome is Outcome.REJECTED
    assert results[1].permanent
    assert results[1].error is not None
    assert "frame_max" in results[1].error
    assert "> limit 131072" in results[1].error
    assert [results[0], *results[2:]] == [CONFIRMED] * 4
    assert again == [CONFIRMED] * 2
    assert still_open, "the publisher lost or replaced its connection"
    assert_arrived_as_written(small + later, await rabbit.read_back(topic, 6))


async def test_connect_error_names_the_address_but_not_the_password(
    rabbitmq: str,
) -> None:
    host, port = address(AMQP_URL, 5672)
    wrong = replace_address("amqp://guest:wrong-s3cret@x/", host, port)
    publisher = RabbitMQPublisher(wrong, connect_timeout=5)

    with pytest.raises(BrokerUnavailableError) as raised:
        await publisher.connect()

    assert f"{host}:{port}" in str(raised.value)
    assert "wrong-s3cret" not in str(raised.value)
    assert "wrong-s3cret" not in repr(publisher)


async def test_exchange_of_another_type_is_reported(rabbit: RabbitMQHarness) -> None:
    name = unique("postroom-direct")
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
    try:
        with pytest.raises(BrokerUnavailableError, match="not a durable topic exchange"):
            await RabbitMQPublisher(AMQP_URL, exchange=name).connect()
    finally:
        await channel.exchange_delete(name)
        await connection.close()


async def test_connection_cut_mid_batch_loses_no_confirmed_message(
    rabbit: RabbitMQHarness, proxy: FaultProxy
) -> None:
    topic = await rabbit.new_topic()
    batch = make_batch(topic, 3000)
    publisher = RabbitMQPublisher(
        proxy.url_for(AMQP_URL),
        exchange=rabbit.exchange,
        connect_timeout=3,
    )
    await publisher.connect()

    publishing = asyncio.ensure_future(publisher.publish(batch))
    await asyncio.sleep(0.05)
    proxy.cut()
    results = await publishing

    outcomes = {r.outcome for r in results}
    assert outcomes <= {Outcome.CONFIRMED, Outcome.UNAVAILABLE}
    assert Outcome.UNAVAILABLE in outcomes, "the cut came too late to test anything"
    confirmed = {str(m.id) for m, r in zip(batch, results, strict=True) if r.confirmed}

    proxy.restore()
    retry = [m for m, r in zip(batch, results, strict=True) if not r.confirmed]
    assert all(r.confirmed for r in await publisher.publish(retry))
    await publisher.close()

    # A message whose confirm was lost in the cut may arrive twice; none may be missing.
    received = await rabbit.read_back(topic, len(batch), wait_seconds=10)
    received += await rabbit.drain(topic)
    arrived = [r.id for r in received]
    assert confirmed <= set(arrived)
    assert set(arrived) == {str(m.id) for m in batch}
    assert len(arrived) - len(batch) <= len(retry)


async def test_missing_confirms_time_out_as_unavailable(
    rabbit: RabbitMQHarness, proxy: FaultProxy
) -> None:
    topic = await rabbit.new_topic()
    publisher = RabbitMQPublisher(
        proxy.url_for(AMQP_URL),
        exchange=rabbit.exchange,
        confirm_timeout=0.5,
        connect_timeout=3,
    )
    await publisher.connect()

    proxy.black_hole()
    frozen = make_batch(topic, 5, tag="f")
    results = await publisher.publish(frozen)
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 5
    assert "no publisher confirm" in (results[0].error or "")

    proxy.restore()
    later = make_batch(topic, 5, tag="l")
    assert await publisher.publish(later) == [CONFIRMED] * 5
    await publisher.close()


async def test_bind_queue_routes_a_topic_pattern_to_a_queue(rabbit: RabbitMQHarness) -> None:
    queue = unique("test-bound")
    publisher = rabbit.make_publisher()
    assert isinstance(publisher, RabbitMQPublisher)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    try:
        await publisher.bind_queue(queue, "invoices.#")
        message = Message.create("invoices.paid", {"n": 1})
        assert await publisher.publish([message]) == [CONFIRMED]
        got = await (await channel.get_queue(queue)).get(no_ack=True, fail=False)
        assert got is not None
        assert got.message_id == str(message.id)
    finally:
        await publisher.close()
        await channel.queue_delete(queue)
        await connection.close()
