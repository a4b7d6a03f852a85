"""Consumer speed: messages/s through a real postroom consumer, against a hand-written loop
and against itself without the inbox.

A backlog of keyed ~250-byte messages is published (with postroom's own publisher, so each
carries the postroom envelope) before the consumer starts; then a ``ConsumerService`` with
one ``async`` handler that inserts one row into a table drains it. The clock runs from the
first handler call to the last acknowledged-and-committed message (Kafka's group join is
not counted).

postroom runs at its default settings (batches of up to 16), with a batch handler that
inserts a batch's rows in one statement (``@consumer.batch_handler``), and at
``consumer_batch_size=1`` (a transaction per message). Two baselines, measured in the same
run on the same backlog (ABCDEEDCBA order, best of two):

- the consumer a team would write by hand (:mod:`hand_written`: aio-pika or confluent-kafka
  plus psycopg, one transaction per message with the inbox insert, same concurrency and
  prefetch) — the ratio users care about;
- the very same postroom service with the inbox insert switched off (the ``Processor``'s
  inbox statements replaced by ones that answer "new" and record nothing): the
  ratio is the cost of writing the inbox row (target <= 15 %).

Each row also gives the CPU time the process spent per message while draining (user and
system, the broker client's threads included; the backlog's publishing is not counted):
steadier than the rates on a shared machine, and what says whether a change made the
consumer cheaper.

    python bench/consumer_overhead.py [--messages 20000] [--brokers rabbitmq,kafka]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import resource
import time
from typing import Any

import hand_written
from common import (
    AMQP_URL,
    DATABASE_URL,
    KAFKA_URL,
    alternating,
    bench_schema,
    create_kafka_topic,
    delete_kafka_topics,
    make_messages,
    quiet,
    result_row,
    unique,
    wait_until,
)
from sqlalchemy import text

from postroom import Consumer, Message, Settings
from postroom.brokers import publisher_from_url, subscriber_from_url
from postroom.consumer import ConsumerService
from postroom.schema.sql import quote_identifier, quoted_table

#: librdkafka group timings that make a group join take seconds, not ~23 s, on Tansu.
KAFKA_CONSUMER_URL = (
    f"{KAFKA_URL}?session.timeout.ms=6000&heartbeat.interval.ms=500&max.poll.interval.ms=7000"
)
TARGET_OVERHEAD = 0.15
#: postroom's consumer at default settings against the hand-written loop (issue target).
TARGET_AGAINST_HAND = 1.5


async def publish_backlog(
    broker_url: str, messages: list[Message], *, queue: str | None = None
) -> None:
    """Publish ``messages`` with postroom's publisher (confirmed), 500 at a time.

    ``queue`` (RabbitMQ): first declare the consumer's queue and bind it to the topic, as
    its subscriber will, so that the backlog is routable.
    """
    publisher = publisher_from_url(broker_url)
    await publisher.connect()
    try:
        if queue is not None:
            await publisher.bind_queue(queue, messages[0].topic)  # type: ignore[attr-defined]
        for start in range(0, len(messages), 500):
            results = await publisher.publish(messages[start : start + 500])
            failed = [r for r in results if not r.confirmed]
            if failed:
                raise RuntimeError(f"backlog publish failed: {failed[0].error}")
    finally:
        await publisher.close()


async def delete_rabbitmq_queues(*queues: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            try:
                await channel.queue_delete(name)
            except Exception:  # already gone: the channel closes, open another
                channel = await connection.channel()


POSTROOM = "postroom"
BATCH_HANDLER = "postroom, batch handler"
SINGLE = "postroom, batch size 1"
NO_INBOX = "postroom, no inbox"
HAND_WRITTEN = "hand-written"
#: postroom with a batch handler (one bulk insert a batch) against the hand-written loop.
TARGET_BATCHED = 3.0
#: postroom with a transaction per message against the hand-written loop.
TARGET_SINGLE = 1.0


async def consume(broker: str, count: int, kind: str) -> dict[str, Any]:
    """Messages/s of one consumer ``kind`` draining a backlog of ``count`` (fresh names
    each run): postroom's, postroom's with the inbox insert switched off, or the
    hand-written loop of :mod:`hand_written`."""
    topic = unique(f"bench.consumer.{broker}.")
    name = unique(f"bench-consumer-{kind.replace(' ', '').replace(',', '-')}-")
    with bench_schema() as schema:
        sink = f"{quote_identifier(schema.name)}.sink"
        schema.execute(
            f"CREATE TABLE {sink} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "message_id text NOT NULL, customer text, total numeric)"
        )
        broker_url = AMQP_URL if broker == "rabbitmq" else KAFKA_CONSUMER_URL
        messages = make_messages(count, topic)
        if broker == "rabbitmq":
            await publish_backlog(AMQP_URL, messages, queue=name)
        else:
            create_kafka_topic(topic)
            await publish_backlog(KAFKA_URL, messages)
        del messages
        cpu_before = _cpu_seconds()
        try:
            if kind == HAND_WRITTEN:
                lanes = hand_written.Lanes(quoted_table(schema.tables.inbox), sink, name)
                if broker == "rabbitmq":
                    elapsed = await hand_written.consume_rabbitmq(name, count, lanes)
                else:
                    elapsed = await hand_written.consume_kafka(topic, count, lanes, name)
            else:
                elapsed = await _consume_with_postroom(
                    schema.name,
                    sink,
                    broker_url,
                    name,
                    topic,
                    count,
                    inbox=kind != NO_INBOX,
                    batch_size=1 if kind == SINGLE else None,
                    bulk=kind == BATCH_HANDLER,
                )
            cpu = _cpu_seconds() - cpu_before
        finally:
            if broker == "rabbitmq":
                await delete_rabbitmq_queues(name, f"{name}.dead-letter")
            else:
                delete_kafka_topics(topic, f"{name}.dead-letter")
        rows = schema.execute(f"SELECT count(*) FROM {sink}")[0]
        recorded = schema.execute(
            f"SELECT count(*) FROM {quoted_table(schema.tables.inbox)} WHERE consumer = :c",
            {"c": name},
        )[0]
    if rows < count:
        raise RuntimeError(f"the {kind} consumer wrote {rows} rows for {count} messages")
    return {
        "seconds": elapsed,
        "rate": count / elapsed,
        "cpu_ms_per_message": 1000 * cpu / count,
        "sink_rows": rows,
        "inbox_rows": recorded,
    }


def _cpu_seconds() -> float:
    """CPU time this process has used (user + system): the consumer runs in it, so the
    difference around a drain is its CPU, steadier than a rate on a noisy machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _consume_with_postroom(
    schema: str,
    sink: str,
    broker_url: str,
    name: str,
    topic: str,
    count: int,
    *,
    inbox: bool,
    batch_size: int | None = None,
    bulk: bool = False,
) -> float:
    """Seconds a ``ConsumerService`` with a one-row handler (``bulk``: a batch handler
    with one multi-row insert a call) takes to drain ``count`` (default settings, or
    ``batch_size``)."""
    settings = Settings(
        database_url=DATABASE_URL,
        schema=schema,
        broker_url=broker_url,
        metrics_port=0,
        inbox_retention=0,
    )
    if batch_size is not None:
        settings = dataclasses.replace(settings, consumer_batch_size=batch_size)
    consumer = Consumer(name, settings)
    insert = text(f"INSERT INTO {sink} (message_id, customer, total) VALUES (:i, :c, :t)")
    first: list[float] = []

    def row(message: Message) -> dict[str, Any]:
        payload = message.payload
        return {"i": str(message.id), "c": payload["customer"], "t": payload["total"]}

    async def handle(message: Message, session: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        await session.execute(insert, row(message))

    async def handle_all(messages: list[Message], session: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        await session.execute(insert, [row(message) for message in messages])

    if bulk:
        consumer.batch_handler(topic)(handle_all)
    else:
        consumer.handler(topic)(handle)

    service = ConsumerService(
        consumer,
        subscriber_from_url(broker_url, prefetch=settings.consumer_prefetch),
        settings,
    )
    if not inbox:
        # The inbox insert becomes a statement that answers with a row ("a new message")
        # and records nothing: the handler runs in the same transaction as before.
        service.processor.transactions.insert = text("SELECT 1")
        service.batches._insert = text(
            "SELECT unnest(CAST(:message_ids AS text[])) WHERE CAST(:consumer AS text) IS NOT NULL"
        )
    handled = service.metrics.handled.labels(topic)
    task = asyncio.create_task(service.run())
    try:
        await wait_until(
            lambda: handled._value.get() >= count,
            within=900,
            what="consumer drain",
            interval=0.005,
            error=TimeoutError,
        )
        return time.perf_counter() - first[0]
    finally:
        service.stop()
        await task


async def scenario(count: int, brokers: list[str]) -> list[dict[str, Any]]:
    """Summary rows of scenario 3, four per broker: postroom's consumer at its defaults
    (batches of up to 16), with a batch handler, and at batch size 1 against the
    hand-written loop; and the defaults against themselves without the inbox."""
    rows = []
    for broker in brokers:
        defaults, bulk, single, plain, hand = await alternating(
            functools.partial(consume, broker, count, POSTROOM),
            functools.partial(consume, broker, count, BATCH_HANDLER),
            functools.partial(consume, broker, count, SINGLE),
            functools.partial(consume, broker, count, NO_INBOX),
            functools.partial(consume, broker, count, HAND_WRITTEN),
        )
        by_hand = (
            f"{hand['rate']:,.0f} msg/s aio-pika/confluent-kafka + psycopg by hand "
            f"({hand['cpu_ms_per_message']:.2f} ms CPU/msg)"
        )
        for label, measured, target in (
            ("defaults (batches of up to 16)", defaults, TARGET_AGAINST_HAND),
            ("batch handler, one insert a batch", bulk, TARGET_BATCHED),
            ("batch size 1", single, TARGET_SINGLE),
        ):
            ratio = measured["rate"] / hand["rate"]
            rows.append(
                result_row(
                    f"3 consumer, {label}, vs hand-written, {count:,} msgs",
                    broker,
                    f"{measured['rate']:,.0f} msg/s postroom "
                    f"({measured['cpu_ms_per_message']:.2f} ms CPU/msg)",
                    by_hand,
                    ratio,
                    f">= {target:.1f}x",
                    ratio >= target,
                    messages=count,
                    postroom=measured,
                    hand_written=hand,
                )
            )
        ratio = defaults["rate"] / plain["rate"]
        rows.append(
            result_row(
                f"3 consumer inbox cost, {count:,} msgs",
                broker,
                f"{defaults['rate']:,.0f} msg/s with inbox",
                f"{plain['rate']:,.0f} msg/s same handler, no inbox",
                ratio,
                f"overhead <= {TARGET_OVERHEAD:.0%} (>= {1 - TARGET_OVERHEAD:.2f}x)",
                ratio >= 1 - TARGET_OVERHEAD,
                messages=count,
                inbox=defaults,
                no_inbox=plain,
                overhead=round(1 - ratio, 3),
            )
        )
    return rows


def main() -> None:
    from run import print_table, save

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--brokers", default="rabbitmq,kafka")
    args = parser.parse_args()
    quiet()
    rows = asyncio.run(scenario(args.messages, args.brokers.split(",")))
    print_table(rows)
    save(rows, "consumer_overhead")


if __name__ == "__main__":
    main()
