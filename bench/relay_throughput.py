"""Relay throughput: drain a backlog to RabbitMQ and Kafka, beside the raw client.

For each broker, the raw client publishes the same messages from memory (aio-pika with
publisher confirms, pipelined in batches; confluent-kafka idempotent with acks=all), then
the relay drains the same number of rows from the outbox until the broker confirmed all.
The ratio relay/raw is what to compare across machines; absolute rates are noisy.

    python bench/relay_throughput.py [--messages 50000] [--brokers rabbitmq,kafka]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from postroom import Message, Outbox, Settings
from postroom.brokers import publisher_from_url
from postroom.database import create_engine
from postroom.log import configure_logging
from postroom.relay import Relay
from postroom.schema import build_tables, migrate

DATABASE_URL = os.environ.get(
    "POSTROOM_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("POSTROOM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
KAFKA_URL = os.environ.get("POSTROOM_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
KEYS = 1000
PIPELINE = 500


def make_messages(count: int, topic: str) -> list[Message]:
    """About 250-byte JSON payloads over 1,000 keys."""
    filler = "x" * 150
    return [
        Message.create(
            topic,
            {"order_id": i, "customer": f"customer-{i % KEYS}", "total": "123.45", "note": filler},
            key=f"customer-{i % KEYS}",
            headers={"source": "bench"},
        )
        for i in range(count)
    ]


@contextlib.asynccontextmanager
async def rabbitmq_sink(topic: str) -> AsyncIterator[Any]:
    """A queue bound to ``topic`` on the relay's exchange, so messages are routable."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange("postroom", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"bench-{uuid.uuid4().hex[:8]}", exclusive=True)
    await queue.bind(exchange, topic)
    try:
        yield exchange
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


async def raw_rabbitmq(exchange: Any, messages: list[Message]) -> float:
    """Seconds for aio-pika to publish ``messages`` with confirms, PIPELINE at a time."""
    import aio_pika

    started = time.perf_counter()
    for start in range(0, len(messages), PIPELINE):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        m.body,
                        message_id=str(m.id),
                        content_type=m.content_type,
                        headers=m.wire_headers(),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=m.topic,
                    mandatory=True,
                )
                for m in messages[start : start + PIPELINE]
            )
        )
    return time.perf_counter() - started


def raw_kafka(messages: list[Message]) -> float:
    """Seconds for confluent-kafka (idempotent, acks=all) to deliver ``messages``."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": KAFKA_URL.removeprefix("kafka://"),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    failures: list[Any] = []

    def report(error: Any, _: Any) -> None:
        if error is not None:
            failures.append(error)

    started = time.perf_counter()
    for m in messages:
        while True:
            try:
                producer.produce(
                    m.topic,
                    m.body,
                    key=m.key,
                    headers=list(m.wire_headers().items()),
                    on_delivery=report,
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"raw Kafka producer failed: {failures[:3]}")
    return elapsed


async def relay_drain(broker_url: str, count: int, topic: str, batch_size: int) -> float:
    """Seconds for the relay to publish a backlog of ``count`` rows until all are confirmed."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    tables = build_tables(schema)
    migrate.upgrade(DATABASE_URL, tables)
    engine = create_engine(DATABASE_URL)
    outbox = Outbox(tables, notify=False)
    try:
        messages = make_messages(count, topic)
        with Session(engine) as session:
            for start in range(0, count, 5000):
                outbox.enqueue_many(session, messages[start : start + 5000])
            session.commit()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'VACUUM ANALYZE "{schema}".outbox'))
        settings = Settings(
            database_url=DATABASE_URL,
            schema=schema,
            broker_url=broker_url,
            relay_batch_size=batch_size,
            metrics_port=0,
        )
        relay = Relay(settings, publisher_from_url(broker_url))
        task = asyncio.create_task(relay.run())
        await _wait_until(lambda: relay.leases.owned != frozenset(), 30)
        started = time.perf_counter()
        await _wait_until(lambda: relay.metrics.published._value.get() >= count, 600)
        elapsed = time.perf_counter() - started
        relay.stop()
        await task
        return elapsed
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


async def _wait_until(check: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(0.005)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--brokers", default="rabbitmq,kafka")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--output", default="bench/results/relay_throughput.json")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    results = []
    for broker in args.brokers.split(","):
        topic = f"bench.{broker}.{uuid.uuid4().hex[:6]}"
        messages = make_messages(args.messages, topic)
        if broker == "rabbitmq":
            async with rabbitmq_sink(topic) as exchange:
                raw = await raw_rabbitmq(exchange, messages)
            async with rabbitmq_sink(topic):
                relayed = await relay_drain(AMQP_URL, args.messages, topic, args.batch_size)
        else:
            raw = await asyncio.to_thread(raw_kafka, messages)
            relayed = await relay_drain(KAFKA_URL, args.messages, topic, args.batch_size)
        results.append(
            {
                "broker": broker,
                "messages": args.messages,
                "raw_msgs_per_s": round(args.messages / raw),
                "relay_msgs_per_s": round(args.messages / relayed),
                "ratio": round(raw / relayed, 3),
            }
        )
    print(f"{'broker':<10}{'messages':>10}{'raw msg/s':>12}{'relay msg/s':>14}{'relay/raw':>11}")
    for r in results:
        print(
            f"{r['broker']:<10}{r['messages']:>10}{r['raw_msgs_per_s']:>12}"
            f"{r['relay_msgs_per_s']:>14}{r['ratio']:>11.2f}"
        )
    save(Path(args.output), results)


def save(path: Path, results: list[dict[str, Any]]) -> None:
    """Write the results as JSON next to the printed table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
