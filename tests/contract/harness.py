"""What the contract suite needs from each broker: a publisher, and a plain client to look.

Each harness reads back what reached the broker with the broker's own client (aio-pika,
confluent-kafka), never through postroom, and knows how to make a poison message.
:func:`make_batch` writes the messages the publisher suites send and
:func:`assert_arrived_as_written` checks what a harness read back against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from postroom.brokers import (
    DeadLetters,
    Publisher,
    Subscriber,
    dead_letters_from_url,
    publisher_from_url,
    subscriber_from_url,
)
from postroom.brokers.memory import MemoryBroker
from postroom.message import HEADER_ID, Message
from tests.support.consuming import KAFKA_GROUP_SETTINGS, unique
from tests.support.network import free_port
from tests.support.readback import Delivered, amqp_delivered, create_topics, read_kafka
from tests.support.services import AMQP_URL, KAFKA_URL

#: A payload over Kafka's default message.max.bytes (1,000,000) but within postroom's 1 MiB.
KAFKA_OVERSIZED = 1_040_000
#: The delay subscriber contract tests give retry_later().
RETRY_DELAY = 0.05
#: Keys of :func:`make_batch`'s messages, ``None`` (no key) among them.
KEYS = ["customer-1", "customer-2", "ключ-3", "k4", None]


class Harness(Protocol):
    """One broker under test."""

    name: str

    def make_publisher(self) -> Publisher:
        """A new, unconnected publisher to this broker."""
        ...

    def unreachable_publisher(self) -> Publisher:
        """A publisher pointed where nothing answers."""
        ...

    async def new_topic(self) -> str:
        """A fresh topic whose messages can be read back."""
        ...

    async def poison(self, topic: str) -> Message:
        """A message this broker refuses (to be REJECTED), related to ``topic``."""
        ...

    async def read_back(
        self, topic: str, count: int, wait_seconds: float = 15.0
    ) -> list[Delivered]:
        """The first ``count`` messages on ``topic``, in broker order (waits for them)."""
        ...

    def make_subscriber(self, prefetch: int = 64) -> Subscriber:
        """A new, unstarted subscriber receiving what this harness's publishers send."""
        ...

    def dead_letters(self, consumer: str) -> DeadLetters:
        """The dead letters of ``consumer`` on this broker."""
        ...

    def forget_consumer(self, consumer: str) -> None:
        """Remove what subscribers of ``consumer`` create, when the harness closes."""
        ...

    async def close(self) -> None:
        """Remove what the harness created."""
        ...


@dataclass
class Outage:
    """A broker that a test can cut off and bring back."""

    harness: Harness
    cut: Callable[[], Awaitable[None]]
    restore: Callable[[], Awaitable[None]]
    keeps_messages: bool
    """False when the broker forgets everything on restart (Tansu's memory storage)."""


def called(action: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """``action`` (a plain call) as the coroutine function an :class:`Outage` awaits."""

    async def call() -> None:
        action()

    return call


def in_thread(action: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """``action`` (a blocking call) run in a thread, as an :class:`Outage` awaits it."""

    async def call() -> None:
        await asyncio.to_thread(action)

    return call


def make_batch(topic: str, count: int, *, tag: str = "") -> list[Message]:
    """Messages with keys (and none), JSON and bytes payloads, and user headers."""
    batch = []
    for i in range(count):
        key = KEYS[i % len(KEYS)]
        headers = {"trace-id": f"trace-{tag}{i}", "tenant": "café ✓"} if i % 2 == 0 else {}
        if i % 3 == 0:
            batch.append(
                Message.create(
                    topic,
                    f"raw {tag}{i} ".encode() + bytes([0, 255, i % 256]),
                    key=key,
                    headers=headers,
                    content_type="application/x-test" if i % 6 == 0 else None,
                )
            )
        else:
            payload = {"seq": i, "tag": tag, "text": "zürich ✓", "nested": [1, 2.5, None, True]}
            batch.append(Message.create(topic, payload, key=key, headers=headers))
    return batch


def assert_arrived_as_written(sent: Sequence[Message], received: Sequence[Delivered]) -> None:
    """Every message arrived once, unchanged, and messages of a key arrived in order."""
    by_id = {r.id: r for r in received}
    assert len(by_id) == len(received) == len(sent), "a message is missing or duplicated"
    for message in sent:
        got = by_id[str(message.id)]
        assert got.topic == message.topic
        assert got.body == message.body
        assert got.content_type == message.content_type
        assert got.key == message.key
        assert got.headers[HEADER_ID] == str(message.id)
        for name, value in message.headers.items():
            assert got.headers[name] == value
    for key in {m.key for m in sent if m.key is not None}:
        assert [r.id for r in received if r.key == key] == [
            str(m.id) for m in sent if m.key == key
        ], f"messages of key {key!r} arrived out of order"


# ----------------------------------------------------------------------------- memory


class MemoryHarness:
    """The in-memory broker, reached through a ``memory://`` URL like a user would."""

    name = "memory"

    def __init__(self) -> None:
        self.broker_name = unique("contract")
        self.broker = MemoryBroker.named(self.broker_name)
        # A limit like librdkafka's default, so the contract's size checks apply here too.
        self.broker.max_message_bytes = 1_000_000

    def make_publisher(self) -> Publisher:
        return publisher_from_url(f"memory://{self.broker_name}")

    def unreachable_publisher(self) -> Publisher:
        broker = MemoryBroker()
        broker.start_outage()
        return broker.publisher()

    async def new_topic(self) -> str:
        return unique("orders")

    async def poison(self, topic: str) -> Message:
        unroutable = unique("nowhere")
        self.broker.make_unroutable(unroutable)
        return Message.create(unroutable, {"poison": True})

    async def read_back(
        self, topic: str, count: int, wait_seconds: float = 15.0
    ) -> list[Delivered]:
        found = self.broker.messages(topic)
        assert len(found) >= count, f"{len(found)} of {count} messages on {topic}"
        return [
            Delivered(
                id=str(m.id),
                topic=m.topic,
                key=m.key,
                body=m.body,
                content_type=m.content_type,
                headers=m.wire_headers(),
                arrived=time.monotonic(),
            )
            for m in found[:count]
        ]

    def make_subscriber(self, prefetch: int = 64) -> Subscriber:
        return subscriber_from_url(f"memory://{self.broker_name}", prefetch=prefetch)

    def dead_letters(self, consumer: str) -> DeadLetters:
        return dead_letters_from_url(f"memory://{self.broker_name}", consumer)

    def forget_consumer(self, consumer: str) -> None:
        return None

    async def close(self) -> None:
        MemoryBroker.forget(self.broker_name)


# ----------------------------------------------------------------------------- RabbitMQ


class RabbitMQHarness:
    """RabbitMQ, with an exchange of this harness's own and one queue per topic."""

    name = "rabbitmq"

    def __init__(
        self, url: str = AMQP_URL, *, publish_url: str | None = None, **publisher_options: Any
    ) -> None:
        self.url = url
        self.publish_url = publish_url or url
        self.publisher_options = publisher_options
        self.exchange = unique("postroom-contract")
        self._connection: Any = None
        self._channel: Any = None
        self._queues: list[str] = []

    async def _ensure_channel(self) -> Any:
        import aio_pika

        if self._channel is None:
            self._connection = await aio_pika.connect(self.url, timeout=5)
            self._channel = await self._connection.channel()
            await self._channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        return self._channel

    def make_publisher(self, **options: Any) -> Publisher:
        options = {"exchange": self.exchange, **self.publisher_options, **options}
        return publisher_from_url(self.publish_url, **options)

    def unreachable_publisher(self) -> Publisher:
        return publisher_from_url(
            f"amqp://guest:s3cret-pw@127.0.0.1:{free_port()}/", connect_timeout=5
        )

    async def new_topic(self) -> str:
        channel = await self._ensure_channel()
        topic = unique("orders")
        queue = await channel.declare_queue(
            f"test-{topic}", durable=False, arguments={"x-expires": 600_000}
        )
        self._queues.append(queue.name)
        await queue.bind(self.exchange, routing_key=topic)
        return topic

    async def poison(self, topic: str) -> Message:
        return Message.create(unique("nowhere"), {"poison": True})

    async def read_back(
        self, topic: str, count: int, wait_seconds: float = 15.0
    ) -> list[Delivered]:
        channel = await self._ensure_channel()
        queue = await channel.get_queue(f"test-{topic}", ensure=False)
        received: list[Delivered] = []
        deadline = time.monotonic() + wait_seconds
        while len(received) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                assert time.monotonic() < deadline, f"{len(received)} of {count} on {topic}"
                await asyncio.sleep(0.05)
                continue
            received.append(amqp_delivered(message, timestamp=message.timestamp))
        return received

    def make_subscriber(self, prefetch: int = 64) -> Subscriber:
        from postroom.brokers.rabbitmq import RabbitMQSubscriber

        return RabbitMQSubscriber(self.url, exchange=self.exchange, prefetch=prefetch)

    def dead_letters(self, consumer: str) -> DeadLetters:
        return dead_letters_from_url(self.url, consumer)

    def forget_consumer(self, consumer: str) -> None:
        from postroom.brokers.rabbitmq import retry_queue_name

        retry = retry_queue_name(consumer, RETRY_DELAY)
        self._queues.extend([consumer, f"{consumer}.dead-letter", retry])

    async def drain(self, topic: str) -> list[Delivered]:
        """Whatever is left on ``topic``'s queue, without waiting for more."""
        channel = await self._ensure_channel()
        queue = await channel.get_queue(f"test-{topic}", ensure=False)
        declared = await channel.declare_queue(queue.name, passive=True)
        left = declared.declaration_result.message_count
        return await self.read_back(topic, left, wait_seconds=0) if left else []

    async def close(self) -> None:
        try:
            await self._ensure_channel()
        except Exception:
            return  # RabbitMQ is gone; nothing can be cleaned up
        for queue in self._queues:
            with contextlib.suppress(Exception):
                await self._channel.queue_delete(queue)
        with contextlib.suppress(Exception):
            await self._channel.exchange_delete(self.exchange)
        await self._connection.close()


# ----------------------------------------------------------------------------- Kafka


class KafkaHarness:
    """Kafka (Tansu here): topics created up front with 3 partitions, read back by assign()."""

    name = "kafka"
    partitions = 3

    def __init__(self, url: str = KAFKA_URL, **publisher_options: Any) -> None:
        from postroom.brokers.kafka import parse_kafka_url

        self.url = url
        self.bootstrap, _ = parse_kafka_url(url)
        self.publisher_options = publisher_options

    def make_publisher(self, **options: Any) -> Publisher:
        return publisher_from_url(self.url, **{**self.publisher_options, **options})

    def unreachable_publisher(self) -> Publisher:
        return publisher_from_url(
            f"kafka://127.0.0.1:{free_port()}", connect_timeout=5, message_timeout_ms=1000
        )

    async def new_topic(self) -> str:
        topic = unique("orders")
        await asyncio.to_thread(create_topics, self.bootstrap, [topic], partitions=self.partitions)
        return topic

    async def poison(self, topic: str) -> Message:
        return Message.create(topic, b"\x00" * KAFKA_OVERSIZED, key="poison")

    async def read_back(
        self, topic: str, count: int, wait_seconds: float = 15.0
    ) -> list[Delivered]:
        return (await read_kafka(self.bootstrap, topic, count, wait_seconds))[:count]

    def make_subscriber(self, prefetch: int = 64) -> Subscriber:
        joiner = "&" if "?" in self.url else "?"
        return subscriber_from_url(f"{self.url}{joiner}{KAFKA_GROUP_SETTINGS}", prefetch=prefetch)

    def dead_letters(self, consumer: str) -> DeadLetters:
        return dead_letters_from_url(self.url, consumer)

    def forget_consumer(self, consumer: str) -> None:
        return None

    async def close(self) -> None:
        return None
