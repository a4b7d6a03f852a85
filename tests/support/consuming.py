"""A consumer in the test's event loop, on the memory broker, RabbitMQ or Kafka.

:class:`Rig` is one broker seen from a consumer test: topics, a subscriber, publishing
(postroom messages or raw ones from another producer), dead-letter read-back and clean-up.
:class:`Running` is a :class:`ConsumerService` running in a task; :func:`running` starts
one, waits until it subscribed, and stops it (and cleans up) when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from postroom.brokers import publisher_from_url
from postroom.brokers.base import Subscriber
from postroom.brokers.memory import MemoryBroker, MemorySubscriber
from postroom.config import Settings
from postroom.consumer import ConsumerService
from postroom.message import Message
from postroom.schema import Tables
from tests.support.readback import create_topics, delete_consumer_queues, read_kafka
from tests.support.services import AMQP_URL, KAFKA_BOOTSTRAP, KAFKA_URL
from tests.support.waiting import wait_until

#: Consumer-group timings Tansu joins quickly with (see DESIGN.md).
KAFKA_GROUP_SETTINGS = "session.timeout.ms=6000&heartbeat.interval.ms=500&max.poll.interval.ms=7000"


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settings_for(database_url: str, tables: Tables, **overrides: Any) -> Settings:
    """Consumer settings for tests: quick backoff, three attempts, no metrics port."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "schema": tables.schema,
        "metrics_port": 0,
        "consumer_backoff_initial": 0.05,
        "consumer_backoff_max": 0.2,
        "consumer_max_attempts": 3,
        "consumer_prefetch": 16,
        "consumer_concurrency": 4,
    }
    values.update(overrides)
    return Settings(**values)


async def publish(url: str, messages: list[Message]) -> None:
    """Publish ``messages`` through postroom's publisher for ``url``; all must be confirmed."""
    publisher = publisher_from_url(url)
    try:
        results = await publisher.publish(messages)
    finally:
        await publisher.close()
    assert all(r.confirmed for r in results), results


class Running:
    """A ConsumerService running in a task of the test's event loop."""

    def __init__(self, service: ConsumerService) -> None:
        self.service = service
        self.task = asyncio.create_task(service.run())

    async def started(self) -> None:
        waiter = asyncio.create_task(self.service.started.wait())
        done, _ = await asyncio.wait({waiter, self.task}, timeout=30, return_when="FIRST_COMPLETED")
        if self.task in done:
            self.task.result()
        assert waiter in done, "the consumer did not subscribe within 30 s"

    async def stop(self) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, 40)


@contextlib.asynccontextmanager
async def running(
    service: ConsumerService, cleanup: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[Running]:
    """Run ``service`` for the block, once it subscribed; then stop it and ``cleanup()``."""
    run = Running(service)
    try:
        await run.started()
        yield run
    finally:
        await run.stop()
        if cleanup is not None:
            await cleanup()


@dataclass(frozen=True)
class RawMessage:
    """A message as another producer sends it: a body, its headers, maybe a content type."""

    body: bytes
    headers: Mapping[str, str]
    content_type: str | None = None
    key: str | None = None
    """Kafka record key (RabbitMQ has none: the routing key is the topic)."""


class Rig:
    """One broker: topics, a subscriber for a consumer, publishing, dead-letter read-back."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.memory = MemoryBroker()
        self.cleanup: list[Callable[[], Any]] = []

    async def topics(self, *prefixes: str, consumer: str) -> list[str]:
        """Fresh topics (on Kafka created, with the consumer's dead-letter topic)."""
        names = [unique(p) for p in prefixes]
        if self.kind == "kafka":
            await asyncio.to_thread(
                create_topics, KAFKA_BOOTSTRAP, [*names, f"{consumer}.dead-letter"]
            )
        return names

    def subscriber(self, settings: Settings) -> Subscriber:
        if self.kind == "memory":
            return MemorySubscriber(self.memory)
        if self.kind == "rabbitmq":
            from postroom.brokers.rabbitmq import RabbitMQSubscriber

            return RabbitMQSubscriber(AMQP_URL, prefetch=settings.consumer_prefetch)
        from postroom.brokers.kafka import KafkaSubscriber

        return KafkaSubscriber.from_url(
            f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}", prefetch=settings.consumer_prefetch
        )

    async def publish(self, messages: list[Message]) -> None:
        if self.kind != "memory":
            await publish(AMQP_URL if self.kind == "rabbitmq" else KAFKA_URL, messages)
            return
        results = await self.memory.publisher().publish(messages)
        assert all(r.confirmed for r in results), results

    async def publish_raw(
        self, topic: str, body: bytes, headers: dict[str, str], content_type: str | None
    ) -> None:
        """A message from another producer: exactly these headers, no postroom envelope."""
        await self.publish_raw_many(topic, [RawMessage(body, headers, content_type)])

    async def publish_raw_many(
        self,
        topic: str,
        messages: Sequence[RawMessage],
        *,
        kafka_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Messages from another producer, on one connection, each confirmed by the broker.

        ``kafka_config`` adds to the Kafka producer's settings (``message.max.bytes`` to
        send a record larger than librdkafka's 1 MB default).
        """
        if self.kind == "memory":
            raise AssertionError("memory takes Message objects")
        if self.kind == "rabbitmq":
            import aio_pika

            connection = await aio_pika.connect(AMQP_URL)
            try:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange("postroom")
                for raw in messages:
                    await exchange.publish(
                        aio_pika.Message(
                            raw.body, headers=dict(raw.headers), content_type=raw.content_type
                        ),
                        routing_key=topic,
                    )
            finally:
                await connection.close()
            return
        from confluent_kafka import Producer

        config: dict[str, Any] = {"bootstrap.servers": KAFKA_BOOTSTRAP, **(kafka_config or {})}
        producer = Producer(config)
        failures: list[str] = []

        def delivered(error: Any, _record: Any) -> None:
            if error is not None:
                failures.append(str(error))

        for raw in messages:
            all_headers = dict(raw.headers)
            if raw.content_type:
                all_headers["content-type"] = raw.content_type
            producer.produce(
                topic,
                value=raw.body,
                key=raw.key,
                headers=list(all_headers.items()),
                on_delivery=delivered,
            )
            producer.poll(0)
        assert await asyncio.to_thread(producer.flush, 30) == 0, "records left unsent"
        assert not failures, failures[:3]

    async def dead_letters(self, consumer: str, count: int) -> list[tuple[bytes, dict[str, str]]]:
        """The first ``count`` messages on the consumer's dead-letter queue/topic."""
        name = f"{consumer}.dead-letter"
        if self.kind == "memory":
            found = self.memory.messages(name)
            assert len(found) >= count
            return [(m.body, m.wire_headers()) for m in found[:count]]
        if self.kind == "kafka":
            received = await read_kafka(KAFKA_BOOTSTRAP, name, count)
            return [(r.body, r.headers) for r in received]
        import aio_pika

        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, durable=True, passive=True)
            out: list[tuple[bytes, dict[str, str]]] = []

            async def taken() -> bool:
                message = await queue.get(fail=False)
                if message is not None:
                    await message.ack()
                    headers = {
                        k: (v.decode() if isinstance(v, bytes) else str(v))
                        for k, v in (message.headers or {}).items()
                    }
                    out.append((message.body, headers))
                return len(out) >= count

            await wait_until(
                taken,
                within=10,
                what=f"{count} dead letters in {name}",
                detail=lambda: f"{len(out)} of {count} taken",
            )
            return out
        finally:
            await connection.close()

    async def close(self, consumer: str) -> None:
        """Remove the consumer's queues (RabbitMQ keeps them; the others need nothing)."""
        if self.kind == "rabbitmq":
            await delete_consumer_queues(AMQP_URL, consumer)

    def running(self, service: ConsumerService, consumer: str) -> Any:
        """:func:`running` for ``service``, removing ``consumer``'s queues afterwards."""
        return running(service, cleanup=lambda: self.close(consumer))
