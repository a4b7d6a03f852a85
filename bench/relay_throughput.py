"""Relay throughput: drain a backlog to RabbitMQ and Kafka, beside the raw client.

For each broker, the raw client publishes the same messages from memory (aio-pika with
publisher confirms, pipelined in batches; confluent-kafka idempotent with acks=all), then
the relay drains the same number of rows from the outbox until the broker confirmed all.
The ratio relay/raw is what to compare across machines; absolute rates are noisy.

    python bench/relay_throughput.py [--messages 50000] [--brokers rabbitmq,kafka]

``bench/run.py`` runs this with the other scenarios and prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from common import (
    BROKER_URLS,
    DATABASE_URL,
    KAFKA_BOOTSTRAP,
    BenchSchema,
    alternating,
    bench_schema,
    create_kafka_topic,
    delete_kafka_topics,
    make_messages,
    quiet,
    rabbitmq_sink,
    result_row,
    unique,
    wait_until,
)
from sqlalchemy.orm import Session

from postroom import Message, Outbox, Settings
from postroom.brokers import publisher_from_url
from postroom.relay import Relay

PIPELINE = 500
TARGETS = {"rabbitmq": 0.9, "kafka": 0.7}


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
                        headers=dict[str, Any](m.wire_headers()),
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
            "bootstrap.servers": KAFKA_BOOTSTRAP,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    failures: list[Any] = []

    def report(error: Any, _: Any) -> None:
        if error is not None:
            failures.append(error)

    # Connected and warm before the clock starts, as the relay's producer is.
    producer.produce(messages[0].topic, b"warm-up")
    producer.flush(30)
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


#: How many rows of a history are written by ``enqueue_many`` (the rest by one INSERT).
HISTORY_ENQUEUED = 50_000


async def run_relay(
    schema: BenchSchema,
    broker_url: str,
    count: int,
    batch_size: int,
    database_url: str,
    *,
    probe: Any = None,
) -> float:
    """Run an in-process relay until its metrics count ``count`` rows confirmed by the
    broker; return the seconds from the moment it owned its partitions (then stop it).
    A ``probe`` is started with the schema just before the relay."""
    settings = Settings(
        database_url=database_url,
        schema=schema.name,
        broker_url=broker_url,
        relay_batch_size=batch_size,
        metrics_port=0,
    )
    relay = Relay(settings, publisher_from_url(broker_url))
    if probe is not None:
        probe.start(schema)
    task = asyncio.create_task(relay.run())
    try:
        await wait_until(
            lambda: relay.leases.owned != frozenset(),
            within=30,
            what="relay start",
            interval=0.005,
            error=TimeoutError,
        )
        started = time.perf_counter()
        await wait_until(
            lambda: relay.metrics.published._value.get() >= count,
            within=900,
            what="relay drain",
            interval=0.005,
            error=TimeoutError,
        )
        return time.perf_counter() - started
    finally:
        relay.stop()
        await task


def enqueue_backlog(schema: BenchSchema, count: int, topic: str) -> None:
    """Write ``count`` pending rows with ``Outbox.enqueue_many``, the product's write path."""
    outbox = Outbox(schema.tables, notify=False)
    messages = make_messages(count, topic)
    with Session(schema.engine) as session:
        for start in range(0, count, 5000):
            outbox.enqueue_many(session, messages[start : start + 5000])
        session.commit()


async def build_history(
    schema: BenchSchema,
    broker_url: str,
    rows: int,
    topic: str,
    batch_size: int,
    database_url: str,
) -> dict[str, Any]:
    """A history made the way a relay makes one: ``rows`` rows written pending (the first
    :data:`HISTORY_ENQUEUED` with ``enqueue_many``, the rest with one INSERT ... SELECT of
    the same shape), then published by a relay, which marks each one from pending to
    published. No VACUUM: the dead tuples the marks leave stay for autovacuum to find."""
    enqueued = min(rows, HISTORY_ENQUEUED)
    started = time.perf_counter()
    enqueue_backlog(schema, enqueued, topic)
    if rows > enqueued:
        schema.bulk_insert(rows - enqueued, topic)
    written = time.perf_counter() - started
    relayed = await run_relay(schema, broker_url, rows, batch_size, database_url)
    return {
        "history_rows": rows,
        "history_enqueued": enqueued,
        "history_write_seconds": round(written, 1),
        "history_relay_seconds": round(relayed, 1),
    }


async def relay_drain(
    broker_url: str,
    count: int,
    topic: str,
    batch_size: int,
    *,
    history: int = 0,
    vacuum: bool = True,
    probe: Any = None,
    database_url: str = DATABASE_URL,
) -> dict[str, Any]:
    """Let an in-process relay publish a backlog of ``count`` rows until all are confirmed.

    The backlog is written with ``Outbox.enqueue_many`` (the product's write path), the
    table vacuumed and analysed (only analysed with ``vacuum=False``), then the clock runs
    from the moment the relay owns its partitions until its metrics count ``count``
    published rows. ``history`` rows are first published by a relay of their own
    (:func:`build_history`). A ``probe`` (see ``cost.py``) is started with the schema just
    before the relay (so its start-up is counted too) and finished after the relay
    stopped; what its ``finish()`` returns joins the result. The outbox's tuple counts at
    the start of the clock join it too.
    """
    with bench_schema(database_url) as schema:
        built: dict[str, Any] = {}
        if history:
            built = await build_history(
                schema, broker_url, history, topic, batch_size, database_url
            )
        enqueue_backlog(schema, count, topic)
        # Closed sessions report their statistics before ANALYZE reads the table.
        schema.engine.dispose()
        if vacuum:
            schema.vacuum_analyze()
        else:
            schema.analyze()
        await asyncio.sleep(1.0)  # the statistics catch up with the table
        state = schema.table_state()
        elapsed = await run_relay(schema, broker_url, count, batch_size, database_url, probe=probe)
        extra: dict[str, Any] = {}
        if probe is not None:
            extra = await probe.finish()
        return {"seconds": elapsed, "rate": count / elapsed, **built, **state, **extra}


async def measure_broker(broker: str, count: int, batch_size: int) -> dict[str, Any]:
    """Raw client and relay on the same messages and topic, twice each in ABBA order,
    the best of each kept (see ``common.alternating``)."""
    topic = unique(f"bench.{broker}.")
    messages = make_messages(count, topic)
    url = BROKER_URLS[broker]

    async def raw() -> dict[str, Any]:
        if broker == "rabbitmq":
            async with rabbitmq_sink(topic) as exchange:
                seconds = await raw_rabbitmq(exchange, messages)
        else:
            seconds = await asyncio.to_thread(raw_kafka, messages)
        return {"seconds": seconds, "rate": count / seconds}

    async def relayed() -> dict[str, Any]:
        if broker == "rabbitmq":
            async with rabbitmq_sink(topic):
                return await relay_drain(url, count, topic, batch_size)
        return await relay_drain(url, count, topic, batch_size)

    if broker == "kafka":
        create_kafka_topic(topic)
    try:
        best_raw, best_relay = await alternating(raw, relayed)
        ceiling = None
        if broker == "kafka":
            # The same drain to the in-memory broker: what claim and mark (PostgreSQL) and
            # the relay's own Python cost, with no broker at all. No broker path beats it.
            ceiling = await relay_drain(f"memory://{unique('bench-')}", count, topic, batch_size)
    finally:
        if broker == "kafka":
            delete_kafka_topics(topic)
    result = {
        "messages": count,
        "batch_size": batch_size,
        "raw_msgs_per_s": round(best_raw["rate"]),
        "relay_msgs_per_s": round(best_relay["rate"]),
        "ratio": round(best_relay["rate"] / best_raw["rate"], 3),
        "raw_rates": best_raw["rates"],
        "relay_rates": best_relay["rates"],
    }
    if ceiling is not None:
        result["ceiling_msgs_per_s"] = round(ceiling["rate"])
        result["ceiling_ratio"] = round(ceiling["rate"] / best_raw["rate"], 3)
    return result


async def scenario(count: int, brokers: list[str], batch_size: int = 500) -> list[dict[str, Any]]:
    """Summary rows of scenario 1 (one per broker)."""
    rows = []
    for broker in brokers:
        r = await measure_broker(broker, count, batch_size)
        target = TARGETS[broker]
        baseline = "aio-pika, confirms" if broker == "rabbitmq" else "confluent-kafka, acks=all"
        rows.append(
            result_row(
                f"1 relay throughput, {count:,} msgs",
                broker,
                f"{r['relay_msgs_per_s']:,} msg/s",
                f"{r['raw_msgs_per_s']:,} msg/s ({baseline})",
                r["ratio"],
                f">= {target}x raw",
                r["ratio"] >= target,
                **r,
            )
        )
        if "ceiling_msgs_per_s" in r:
            rows.append(
                result_row(
                    f"1 relay ceiling: same drain to the in-memory broker, {count:,} msgs",
                    "memory",
                    f"{r['ceiling_msgs_per_s']:,} msg/s (no broker: database + relay CPU)",
                    f"{r['raw_msgs_per_s']:,} msg/s ({baseline})",
                    r["ceiling_ratio"],
                    "",
                    None,
                    **r,
                )
            )
    return rows


def main() -> None:
    from run import print_table, save

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--brokers", default="rabbitmq,kafka")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    quiet()
    rows = asyncio.run(scenario(args.messages, args.brokers.split(","), args.batch_size))
    print_table(rows)
    save(rows, "relay_throughput")


if __name__ == "__main__":
    main()
