"""The consumer a team would write by hand: the baseline postroom's consumer is measured against.

Same work as postroom's consumer in ``consumer_overhead``: per message one transaction
that records ``(consumer, message id)`` in the inbox table (``ON CONFLICT DO NOTHING``, a
duplicate is acknowledged without its effect), inserts one row into the sink table and
commits; the message is acknowledged after the commit. Same concurrency: 8 lanes, each with
its own psycopg connection; RabbitMQ deliveries go to a lane by message key (so each key
stays in order) with a prefetch of 32, Kafka records go to a lane by partition (as postroom
does) with up to 32 waiting per partition and offsets stored after the commit.

Nothing else a production loop would need is here — no retry, no dead-letter queue, no
metrics, no health probe — so the ratio is the price of what postroom adds on top of the
bare transaction.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from common import AMQP_URL, DATABASE_URL, KAFKA_BOOTSTRAP, wait_until

from postroom.message import HEADER_ID, HEADER_KEY

LANES = 8
PREFETCH = 32


class Lanes:
    """``LANES`` workers, each with its own connection, running one transaction per message."""

    def __init__(self, inbox: str, sink: str, consumer: str) -> None:
        self.consumer = consumer
        self.record = (
            f"INSERT INTO {inbox} (consumer, message_id) VALUES (%s, %s) ON CONFLICT DO NOTHING"
        )
        self.effect = f"INSERT INTO {sink} (message_id, customer, total) VALUES (%s, %s, %s)"
        self.queues: list[asyncio.Queue[tuple[str, bytes, Callable[[], Awaitable[None]]]]] = [
            asyncio.Queue(PREFETCH) for _ in range(LANES)
        ]
        self.handled = 0
        self.first: float | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        url = DATABASE_URL.replace("+psycopg", "")
        for queue in self.queues:
            connection = await psycopg.AsyncConnection.connect(url)
            self.tasks.append(asyncio.create_task(self._work(connection, queue)))

    async def _work(
        self,
        connection: psycopg.AsyncConnection[Any],
        queue: asyncio.Queue[tuple[str, bytes, Callable[[], Awaitable[None]]]],
    ) -> None:
        try:
            while True:
                message_id, body, ack = await queue.get()
                if self.first is None:
                    self.first = time.perf_counter()
                payload = json.loads(body)
                async with connection.transaction():
                    cursor = await connection.execute(self.record, (self.consumer, message_id))
                    if cursor.rowcount == 1:
                        await connection.execute(
                            self.effect, (message_id, payload["customer"], payload["total"])
                        )
                await ack()
                self.handled += 1
        finally:
            await connection.close()

    async def put(self, lane: int, item: tuple[str, bytes, Callable[[], Awaitable[None]]]) -> None:
        await self.queues[lane].put(item)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def drain(lanes: Lanes, count: int) -> float:
    """Seconds from the first message handled to the ``count``-th acknowledged."""
    await wait_until(
        lambda: lanes.handled >= count,
        within=900,
        what="hand-written consumer drain",
        interval=0.005,
        error=TimeoutError,
    )
    assert lanes.first is not None
    return time.perf_counter() - lanes.first


async def consume_rabbitmq(queue: str, count: int, lanes: Lanes) -> float:
    """Drain ``count`` messages from ``queue`` with aio-pika; seconds taken."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        declared = await channel.get_queue(queue)
        await lanes.start()

        async def deliver(delivery: aio_pika.abc.AbstractIncomingMessage) -> None:
            headers = delivery.headers or {}
            message_id = str(headers.get(HEADER_ID) or delivery.message_id)
            key = str(headers.get(HEADER_KEY, message_id)).encode()
            await lanes.put(zlib.crc32(key) % LANES, (message_id, delivery.body, delivery.ack))

        await declared.consume(deliver)
        return await drain(lanes, count)
    finally:
        await lanes.stop()
        await connection.close()


async def consume_kafka(topic: str, count: int, lanes: Lanes, group: str) -> float:
    """Drain ``count`` records of ``topic`` with confluent-kafka; seconds taken."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": KAFKA_BOOTSTRAP,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "max.poll.interval.ms": 7000,
        }
    )
    consumer.subscribe([topic])
    await lanes.start()
    polling = True

    async def poll() -> None:
        while polling:
            records = await asyncio.to_thread(consumer.consume, 500, 0.1)
            for record in records:
                if record.error():
                    continue
                headers: dict[str, Any] = dict(record.headers() or [])
                message_id = bytes(headers[HEADER_ID]).decode()

                async def ack(record: Any = record) -> None:
                    consumer.store_offsets(record)

                lane = (record.partition() or 0) % LANES
                await lanes.put(lane, (message_id, bytes(record.value() or b""), ack))

    poller = asyncio.create_task(poll())
    try:
        return await drain(lanes, count)
    finally:
        polling = False
        await poller
        await lanes.stop()
        await asyncio.to_thread(consumer.close)
