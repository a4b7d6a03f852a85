"""What the contract suite needs from each broker: a publisher, and a plain client to look.

Each harness reads back what reached the broker with the broker's own client (aio-pika,
confluent-kafka), never through postroom, and knows how to make a poison message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from postroom.brokers import (
    DeadLetters,
    Publisher,
    Subscriber,
    dead_letters_from_url,
    publisher_from_url,
    subscriber_from_url,
)
from postroom.brokers.memory import MemoryBroker
from postroom.message import HEADER_KEY, Message

AMQP_URL = os.environ.get("POSTROOM_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_URL = os.environ.get("POSTROOM_TEST_KAFKA_URL") or "kafka://127.0.0.1:9092"
#: A payload over Kafka's default message.max.bytes (1,000,000) but within postroom's 1 MiB.
KAFKA_OVERSIZED = 1_040_000
#: The delay subscriber contract tests give retry_later().
RETRY_DELAY = 0.05
#: Consumer-group timings that make a group join take seconds on Tansu, not ~25 s.
KAFKA_GROUP_SETTINGS = "session.timeout.ms=6000&heartbeat.interval.ms=500&max.poll.interval.ms=7000"


@dataclass(frozen=True)
class Received:
    """One message as the broker's own client saw it."""

    id: str
    topic: str
    key: str | None
    body: bytes
    content_type: str
    headers: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


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

    async def read_back(self, topic: str, count: int, wait_seconds: float = 15.0) -> list[Received]:
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


def free_port() -> int:
    """A local TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}.{uuid.uuid4().hex[:16]}"


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

    async def read_back(self, topic: str, count: int, wait_seconds: float = 15.0) -> list[Received]:
        found = self.broker.messages(topic)
        assert len(found) >= count, f"{len(found)} of {count} messages on {topic}"
        return [
            Received(
                id=str(m.id),
                topic=m.topic,
                key=m.key,
                body=m.body,
                content_type=m.content_type,
                headers=m.wire_headers(),
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

    async def read_back(self, topic: str, count: int, wait_seconds: float = 15.0) -> list[Received]:
        channel = await self._ensure_channel()
        queue = await channel.get_queue(f"test-{topic}", ensure=False)
        received: list[Received] = []
        deadline = time.monotonic() + wait_seconds
        while len(received) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                assert time.monotonic() < deadline, f"{len(received)} of {count} on {topic}"
                await asyncio.sleep(0.05)
                continue
            headers = {name: _text(value) for name, value in (message.headers or {}).items()}
            received.append(
                Received(
                    id=str(message.message_id),
                    topic=str(message.routing_key),
                    key=headers.get(HEADER_KEY),
                    body=message.body,
                    content_type=str(message.content_type),
                    headers=headers,
                    extra={
                        "delivery_mode": int(message.delivery_mode),
                        "timestamp": message.timestamp,
                        "exchange": message.exchange,
                    },
                )
            )
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

    async def drain(self, topic: str) -> list[Received]:
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


def amqp_address(url: str) -> tuple[str, int]:
    """Host and port of an AMQP URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def amqp_address_replaced(url: str, host: str, port: int) -> str:
    """``url`` pointed at ``host:port``, keeping its user, password and vhost."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        from confluent_kafka.admin import AdminClient, NewTopic

        topic = unique("orders")
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=self.partitions, replication_factor=1)],
            operation_timeout=10,
        )
        await asyncio.to_thread(futures[topic].result, 10)
        return topic

    async def poison(self, topic: str) -> Message:
        return Message.create(topic, b"\x00" * KAFKA_OVERSIZED, key="poison")

    async def read_back(self, topic: str, count: int, wait_seconds: float = 15.0) -> list[Received]:
        return await asyncio.to_thread(self._consume, topic, count, wait_seconds)

    def _consume(self, topic: str, count: int, timeout: float) -> list[Received]:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": unique("contract-reader"),
                "enable.auto.commit": False,
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        try:
            deadline = time.monotonic() + timeout
            metadata = consumer.list_topics(topic, timeout=10)
            partitions = sorted(metadata.topics[topic].partitions)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            received: list[Received] = []
            while len(received) < count and time.monotonic() < deadline:
                for record in consumer.consume(num_messages=500, timeout=0.5):
                    if record.error() is not None:
                        continue
                    headers = {name: _text(value) for name, value in record.headers() or []}
                    key = record.key()
                    received.append(
                        Received(
                            id=headers.get("postroom-id", ""),
                            topic=record.topic(),
                            key=key.decode() if key is not None else None,
                            body=record.value() or b"",
                            content_type=headers.get("postroom-content-type", ""),
                            headers=headers,
                            extra={
                                "partition": record.partition(),
                                "offset": record.offset(),
                                "timestamp": record.timestamp(),
                            },
                        )
                    )
            assert len(received) >= count, f"{len(received)} of {count} messages on {topic}"
            return received[:count]
        finally:
            consumer.close()

    def make_subscriber(self, prefetch: int = 64) -> Subscriber:
        joiner = "&" if "?" in self.url else "?"
        return subscriber_from_url(f"{self.url}{joiner}{KAFKA_GROUP_SETTINGS}", prefetch=prefetch)

    def dead_letters(self, consumer: str) -> DeadLetters:
        return dead_letters_from_url(self.url, consumer)

    def forget_consumer(self, consumer: str) -> None:
        return None

    async def close(self) -> None:
        return None


# ----------------------------------------------------------------------------- fault tools


class TcpProxy:
    """A local TCP proxy that can be cut (every connection dropped, new ones refused)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        """Listen on ``self.port`` (the same port after a cut)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Drop every connection at once and refuse new ones until :meth:`start`."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze(self) -> None:
        """Stop forwarding bytes (connections stay open, like a network black hole)."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward bytes again."""
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
                self._tasks.discard(pipe)
            for end in (writer, up_writer):
                end.transport.abort()
                self._writers.discard(end)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()


class PrivateTansu:
    """A Tansu broker of this test's own on a free port, to stop and start at will."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Its ``kafka://`` URL."""
        return f"kafka://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start it (in-memory storage: a restart forgets every topic) and wait until it listens."""
        listener = f"tcp://127.0.0.1:{self.port}"
        self._process = await asyncio.create_subprocess_exec(
            self.binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_until(self._listens, seconds=10, what=f"Tansu on port {self.port}")

    async def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to clients)."""
        if self._process is not None:
            self._process.kill()
            await self._process.wait()
            self._process = None

    async def _listens(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        return True


async def wait_until(check: Callable[[], Awaitable[bool]], *, seconds: float, what: str) -> None:
    """Poll ``check`` until it is true; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)
