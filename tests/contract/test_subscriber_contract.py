"""The Subscriber and Delivery contract, run unchanged against memory, RabbitMQ and Kafka.

Each test starts a subscriber for a fresh consumer, publishes through the broker's own
postroom publisher and judges only what comes out: which messages, in which order, how
often, and what each delivery says about itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

from postroom.brokers import Delivery, Subscriber
from postroom.message import HEADER_ID, HEADER_KEY, Message
from tests.contract.harness import RETRY_DELAY, Harness
from tests.support.consuming import unique

#: Seconds to wait for a delivery that must come (a Kafka group join takes a few).
ARRIVAL = 30.0
#: Seconds to watch for a delivery that must not come.
QUIET = 1.5


class Taken:
    """A started subscriber whose deliveries are pumped into a queue the test reads."""

    def __init__(self, broker: Harness, subscriber: Subscriber) -> None:
        self.broker = broker
        self.subscriber = subscriber
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for delivery in self.subscriber.deliveries():
            await self.queue.put(delivery)

    async def take(self, count: int, seconds: float = ARRIVAL) -> list[Delivery]:
        """The next ``count`` deliveries; fails if they do not all come in time."""
        taken: list[Delivery] = []
        deadline = time.monotonic() + seconds
        while len(taken) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(taken)} of {count} deliveries within {seconds:g} s"
            with contextlib.suppress(TimeoutError):
                taken.append(await asyncio.wait_for(self.queue.get(), left))
        return taken

    async def receive(self, messages: Sequence[Message]) -> list[Delivery]:
        """Publish ``messages`` and take as many deliveries."""
        await publish(self.broker, messages)
        return await self.take(len(messages))

    async def more(self, seconds: float = QUIET) -> list[Delivery]:
        """Whatever else comes within ``seconds``."""
        await asyncio.sleep(seconds)
        found = []
        while not self.queue.empty():
            found.append(self.queue.get_nowait())
        return found

    async def close(self) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        await self.subscriber.close()


@contextlib.asynccontextmanager
async def subscribed(broker: Harness, consumer: str, topics: Sequence[str]) -> AsyncIterator[Taken]:
    """A subscriber of ``consumer`` to ``topics``, closed afterwards."""
    broker.forget_consumer(consumer)
    subscriber = broker.make_subscriber()
    await subscriber.start(consumer, topics)
    taken = Taken(broker, subscriber)
    try:
        yield taken
    finally:
        await taken.close()


async def publish(broker: Harness, messages: Sequence[Message]) -> None:
    publisher = broker.make_publisher()
    await publisher.connect()
    try:
        results = await publisher.publish(messages)
    finally:
        await publisher.close()
    assert all(result.confirmed for result in results), results


def ids(deliveries: Sequence[Delivery]) -> list[str]:
    return [delivery.headers[HEADER_ID] for delivery in deliveries]


async def test_deliveries_carry_the_message_and_an_acked_one_does_not_come_again(
    broker: Harness,
) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-ack")
    sent = [Message.create(topic, {"n": n}, key=f"k{n}") for n in range(5)]
    async with subscribed(broker, consumer, [topic]) as first:
        got = await first.receive(sent)
        assert isinstance(first.subscriber, Subscriber)
        assert all(isinstance(delivery, Delivery) for delivery in got)
        assert sorted(ids(got)) == sorted(str(m.id) for m in sent)
        by_id = {str(m.id): m for m in sent}
        for delivery in got:
            message = by_id[delivery.headers[HEADER_ID]]
            assert (delivery.topic, delivery.body) == (topic, message.body)
            assert delivery.headers[HEADER_KEY] == message.key
            assert delivery.attempt == 1
            await delivery.ack()
        assert await first.more() == []
    marker = Message.create(topic, {"marker": True}, key="k0")
    async with subscribed(broker, consumer, [topic]) as second:
        (arrived,) = await second.receive([marker])
        later = await second.more()
        assert ids([arrived, *later]) == [str(marker.id)], "an acknowledged message came again"
        await arrived.ack()


async def test_a_released_delivery_comes_again_as_the_same_message(broker: Harness) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-release")
    message = Message.create(topic, {"order": 1}, key="order-1")
    async with subscribed(broker, consumer, [topic]) as taken:
        (first,) = await taken.receive([message])
        assert await first.release() is True
        (again,) = await taken.take(1)
        assert ids([first, again]) == [str(message.id)] * 2
        assert again.body == first.body
        assert again.attempt == first.attempt
        await again.ack()
        assert await taken.more() == []


async def test_messages_of_a_key_share_a_lane_and_keep_their_order(broker: Harness) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-order")
    keys = ["alpha", "beta", "gamma"]
    sent = [Message.create(topic, {"n": n}, key=keys[n % 3]) for n in range(30)]
    async with subscribed(broker, consumer, [topic]) as taken:
        got = await taken.receive(sent)
        for delivery in got:
            await delivery.ack()
    for key in keys:
        mine = [d for d in got if d.headers[HEADER_KEY] == key]
        assert ids(mine) == [str(m.id) for m in sent if m.key == key], f"key {key} reordered"
        assert len({repr(d.lane) for d in mine}) == 1, f"key {key} spread over lanes"


async def test_only_a_delivery_whose_lane_moved_away_reports_revoked(broker: Harness) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-revoke")
    sent = [Message.create(topic, {"n": n}, key=f"key-{n}") for n in range(24)]
    async with subscribed(broker, consumer, [topic]) as first:
        held = await first.receive(sent)
        assert not any(d.revoked for d in held), "revoked before anything changed"
        async with subscribed(broker, consumer, [topic]) as second:
            if broker.name != "kafka":
                # A queue has no lanes to lose: a second subscriber changes nothing.
                await second.more()
                assert not any(d.revoked for d in held)
                for delivery in held:
                    await delivery.ack()
                return
            # Kafka: the group rebalances and the second member reads the partitions it
            # got from the committed offsets (none): what the first holds there is revoked.
            moved = {repr(d.lane) for d in await second.take(1)}
            moved |= {repr(d.lane) for d in await second.more()}
            in_moved = [d for d in held if repr(d.lane) in moved]
            assert in_moved, "the second member got no partition the first held records of"
            assert all(d.revoked for d in in_moved)


async def test_retry_later_comes_back_as_the_next_attempt_where_the_broker_can(
    broker: Harness,
) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-retry")
    message = Message.create(topic, {"retry": True}, key="r")
    async with subscribed(broker, consumer, [topic]) as taken:
        (first,) = await taken.receive([message])
        if not first.redeliverable:
            # Kafka retries in place to keep the partition's order.
            assert broker.name == "kafka"
            try:
                await first.retry_later(RETRY_DELAY, "not yet")
            except NotImplementedError:
                await first.ack()
                return
            raise AssertionError("retry_later of an unredeliverable delivery did not refuse")
        await first.retry_later(RETRY_DELAY, "not yet")
        (again,) = await taken.take(1)
        assert ids([again]) == [str(message.id)]
        assert again.attempt == first.attempt + 1
        await again.ack()


async def test_a_dead_letter_is_found_with_its_reason_and_not_delivered_again(
    broker: Harness,
) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-dead")
    message = Message.create(topic, {"poison": 1}, key="p")
    async with subscribed(broker, consumer, [topic]) as taken:
        (delivery,) = await taken.receive([message])
        await delivery.dead_letter("the handler said no", 3)
        assert await taken.more() == []
    found = await broker.dead_letters(consumer).find(str(message.id))
    assert found.letter is not None
    assert found.copies == 1
    assert (found.letter.topic, found.letter.attempts) == (topic, 3)
    assert found.letter.error == "the handler said no"
    assert found.letter.body == message.body


async def test_a_delivery_left_unsettled_by_a_closed_subscriber_comes_again_as_redelivered(
    broker: Harness,
) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-redelivered")
    message = Message.create(topic, {"order": 7}, key="order-7")
    async with subscribed(broker, consumer, [topic]) as first:
        (held,) = await first.receive([message])
        if held.lane is None:
            # A queue knows a first delivery. (A Kafka partition's first record after an
            # assignment counts as redelivered: it is the one a dead owner may have held.)
            assert held.redelivered is False
        # Closed without settling it, as a consumer process that died would.
    async with subscribed(broker, consumer, [topic]) as second:
        (again,) = await second.take(1)
        assert ids([again]) == [str(message.id)]
        assert again.redelivered is True
        assert again.attempt == held.attempt
        await again.ack()


async def test_only_the_first_record_after_an_assignment_or_a_release_counts_as_redelivered(
    broker: Harness,
) -> None:
    topic = await broker.new_topic()
    consumer = unique("contract-redelivered-once")
    sent = [Message.create(topic, {"n": n}, key="one-key") for n in range(3)]
    async with subscribed(broker, consumer, [topic]) as taken:
        got = await taken.receive(sent)
        if got[0].lane is None:
            assert [d.redelivered for d in got] == [False, False, False]
            assert await got[0].release() is True
            (again,) = await taken.take(1)
            assert again.redelivered is True
            await again.ack()
        else:
            assert [d.redelivered for d in got] == [True, False, False]
            await got[0].ack()
        for delivery in got[1:]:
            await delivery.ack()
