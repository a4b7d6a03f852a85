"""postroom demo: the whole path, end to end, against the real services.

1. Orders are written with their message in one transaction; declined ones roll back,
   and their message vanishes with them.
2. The relay publishes the committed messages to RabbitMQ and marks them published once
   RabbitMQ confirms.
3. A billing consumer charges each order in a transaction that also records the message
   in its inbox and enqueues a follow-up message. RabbitMQ then delivers one message a
   second time (as brokers do after a lost acknowledgement): the inbox skips it.
4. A summary shows every committed order charged exactly once.

When no RabbitMQ answers at POSTROOM_TEST_AMQP_URL, the same walk-through runs on the
Kafka-compatible broker at POSTROOM_TEST_KAFKA_URL instead, and says so.

Run with `make demo` (it starts the services and creates postroom's tables first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import uuid
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Numeric, Table, Text, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom.database import create_engine
from postroom.log import configure_logging
from postroom.schema.tables import tables_for
from postroom.urls import redact_url

metadata = MetaData(schema="postroom_demo")
orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("customer", Text, nullable=False),
    Column("total", Numeric(10, 2), nullable=False),
    Column("run", Text, nullable=False),
)
charges = Table(
    "charges",
    metadata,
    Column("order_id", Integer, nullable=False),
    Column("amount", Numeric(10, 2), nullable=False),
    Column("run", Text, nullable=False),
)

ORDERS = 12
DECLINED_EVERY = 4


class PaymentDeclined(Exception):
    """The business rule that makes some orders fail after their message was enqueued."""


def place_orders(engine: Any, run: str, first_id: int) -> list[int]:
    """Write each order and its message in one transaction; return the committed ids."""
    committed = []
    for n in range(ORDERS):
        order_id = first_id + n
        customer = f"customer-{n % 5}"
        try:
            with Session(engine) as session:
                session.execute(
                    orders.insert().values(id=order_id, customer=customer, total="42.00", run=run)
                )
                postroom.enqueue(
                    session,
                    "orders.created",
                    {"order_id": order_id, "customer": customer, "total": "42.00"},
                    key=customer,
                    headers={"demo-run": run},
                )
                if n % DECLINED_EVERY == DECLINED_EVERY - 1:
                    raise PaymentDeclined(f"card of {customer} declined")
                session.commit()
                committed.append(order_id)
        except PaymentDeclined:
            pass
    return committed


def billing_consumer(run: str) -> postroom.Consumer:
    """The consumer under test: charge the order, and announce the charge."""
    consumer = postroom.Consumer(f"demo-billing-{run}")

    @consumer.handler("orders.created")
    async def charge(message: postroom.Message, session: AsyncSession) -> None:
        if message.headers.get("demo-run") != run:
            return  # an order from an earlier demo run
        order = message.payload
        await session.execute(
            charges.insert().values(order_id=order["order_id"], amount=order["total"], run=run)
        )
        await consumer.outbox.enqueue_async(
            session, "charges.made", {"order_id": order["order_id"]}, key=order["customer"]
        )
        delivered.append(message)

    return consumer


delivered: list[postroom.Message] = []


#: The topics the demo writes to.
TOPICS = ("orders.created", "charges.made")

#: librdkafka settings for the Kafka walk-through: a consumer group joins in seconds.
KAFKA_QUICK_JOIN = "session.timeout.ms=6000&heartbeat.interval.ms=500&max.poll.interval.ms=7000"


async def pick_broker(settings: postroom.Settings) -> tuple[str, str]:
    """The broker URL and name to run on: RabbitMQ if it answers, else the Kafka one."""
    import aio_pika

    amqp_url = os.environ.get("POSTROOM_TEST_AMQP_URL", settings.broker_url)
    probe_log = logging.getLogger("aiormq.connection")
    probe_log.disabled = True  # a refused probe is reported below, in one sentence
    try:
        connection = await asyncio.wait_for(aio_pika.connect(amqp_url), 10)
    except Exception:
        kafka_url = os.environ.get("POSTROOM_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
        print(
            f"RabbitMQ does not answer at {redact_url(amqp_url)}, so this walk-through "
            f"runs on the Kafka-compatible broker at {redact_url(kafka_url)} instead"
        )
        create_kafka_topics(kafka_url)
        return kafka_url, "Kafka"
    finally:
        probe_log.disabled = False
    await connection.close()
    return amqp_url, "RabbitMQ"


def create_kafka_topics(kafka_url: str) -> None:
    """Create the demo's topics up front: a consumer sees a new topic only later."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from postroom.brokers.kafka.settings import parse_kafka_url

    servers, config = parse_kafka_url(kafka_url)
    admin = AdminClient({**config, "bootstrap.servers": servers})
    created = admin.create_topics(
        [NewTopic(name, num_partitions=4, replication_factor=1) for name in TOPICS]
    )
    for future in created.values():
        with contextlib.suppress(Exception):  # already there from an earlier run
            future.result(15)


def subscriber_url(broker_url: str) -> str:
    """The URL the demo consumer reads from: on Kafka, with settings that join quickly."""
    if not broker_url.startswith("kafka"):
        return broker_url
    joiner = "&" if "?" in broker_url else "?"
    return f"{broker_url}{joiner}{KAFKA_QUICK_JOIN}"


async def run_pipeline(
    settings: postroom.Settings, broker_url: str, run: str, committed: list[int]
) -> int:
    """Relay and consumer until every committed order is charged; return duplicates seen."""
    from postroom.brokers import publisher_from_url, subscriber_from_url
    from postroom.consumer.runner import ConsumerService
    from postroom.relay import Relay

    settings = dataclasses.replace(settings, metrics_port=0, relay_poll_interval=0.2)
    consumer = billing_consumer(run)
    consumer.configure(settings)
    subscriber = subscriber_from_url(
        subscriber_url(broker_url), prefetch=settings.consumer_prefetch
    )
    service = ConsumerService(consumer, subscriber, settings)
    consuming = asyncio.create_task(service.run())
    await asyncio.wait_for(service.started.wait(), 60)  # subscribed: messages reach it
    follow_ups = await _follow_up_sink(broker_url, run)
    relay = Relay(settings, publisher_from_url(broker_url))
    relaying = asyncio.create_task(relay.run())
    again_publisher = publisher_from_url(broker_url)
    try:
        await _until(lambda: len(delivered) >= len(committed))
        # A new Kafka consumer group reads its topics from the start, earlier demo runs'
        # redeliveries included: count only the duplicates that come after them.
        before = await _settled(lambda: _counted(service))
        # The same message is published a second time, as a relay does when it crashed
        # after the broker's confirm but before marking the row: the inbox must skip it.
        await again_publisher.connect()
        await again_publisher.publish([delivered[0]])
        await _until(lambda: _counted(service) >= before + 1)
        await asyncio.sleep(0.5)  # the relay records the follow-ups' confirmations
    finally:
        relay.stop()
        service.stop()
        await asyncio.gather(relaying, consuming)
        await again_publisher.close()
        await _clean_up(broker_url, consumer.name, follow_ups)
    return _counted(service) - before


async def _follow_up_sink(broker_url: str, run: str) -> Any:
    """On RabbitMQ, a queue for the follow-ups, so they route (an unroutable one fails)."""
    if not broker_url.startswith("amqp"):
        return None  # Kafka keeps every record in its topic; nothing to bind
    import aio_pika

    connection = await aio_pika.connect(broker_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange("postroom", aio_pika.ExchangeType.TOPIC, durable=True)
    notifications = await channel.declare_queue(f"demo-notifications-{run}", exclusive=True)
    await notifications.bind(exchange, "charges.made")
    return connection, channel


async def _clean_up(broker_url: str, consumer: str, follow_ups: Any) -> None:
    """Delete the demo consumer's RabbitMQ queues (Kafka's group needs no clean-up)."""
    if follow_ups is None:
        return
    connection, channel = follow_ups
    for queue in (consumer, f"{consumer}.dead-letter"):
        await channel.queue_delete(queue)
    await connection.close()


async def _until(check: Any, seconds: float = 60.0) -> None:
    """Wait until ``check()`` is true; fail after ``seconds``."""
    for _ in range(int(seconds * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the demo did not finish in time")


async def _settled(value: Any, quiet: float = 1.0) -> int:
    """``value()`` once it has not changed for ``quiet`` seconds (at most 30 s)."""
    last, since = value(), asyncio.get_running_loop().time()
    for _ in range(300):
        await asyncio.sleep(0.1)
        now = asyncio.get_running_loop().time()
        if value() != last:
            last, since = value(), now
        elif now - since >= quiet:
            break
    return int(last)


def _counted(service: Any) -> int:
    """Duplicates the consumer's inbox has skipped so far (from its metrics)."""
    samples = [s for m in service.metrics.duplicates.collect() for s in m.samples]
    return int(sum(s.value for s in samples if s.name.endswith("_total")))


def main() -> int:
    """Run the demo and check its outcome; exit 1 if anything is off."""
    configure_logging(level="warning")
    settings = postroom.Settings.from_env()
    engine = create_engine(settings.database_url)
    run = uuid.uuid4().hex[:8]
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS postroom_demo"))
        metadata.create_all(connection)
        first_id = (
            int(connection.execute(select(func.coalesce(func.max(orders.c.id), 0))).scalar_one())
            + 1
        )

    print(f"postroom demo, run {run}")
    broker_url, broker = asyncio.run(pick_broker(settings))
    committed = place_orders(engine, run, first_id)
    outbox = tables_for(settings).outbox
    this_run = outbox.c.headers["demo-run"].astext == run
    with engine.connect() as connection:
        written = connection.execute(select(func.count()).where(this_run)).scalar_one()
    print(
        f"1. {ORDERS} orders placed: {len(committed)} committed, "
        f"{ORDERS - len(committed)} declined and rolled back; outbox rows: {written}"
    )

    duplicates = asyncio.run(run_pipeline(settings, broker_url, run, committed))
    with engine.connect() as connection:
        published = connection.execute(
            select(func.count()).where(this_run, outbox.c.status == "published")
        ).scalar_one()
        charged = (
            connection.execute(
                select(charges.c.order_id).where(charges.c.run == run).order_by(charges.c.order_id)
            )
            .scalars()
            .all()
        )
        follow_ups = connection.execute(
            select(func.count()).where(
                outbox.c.topic == "charges.made",
                outbox.c.payload.in_([f'{{"order_id":{i}}}'.encode() for i in committed]),
            )
        ).scalar_one()
    engine.dispose()
    print(f"2. relay: {published} of {written} messages confirmed by {broker} and marked published")
    print(
        f"3. consumer: {len(charged)} charges written, {duplicates} redelivered message skipped "
        f"by the inbox, {follow_ups} follow-up messages enqueued with the charges"
    )
    ok = (
        written == len(committed)
        and published == len(committed)
        and list(charged) == committed
        and duplicates == 1
        and follow_ups == len(committed)
    )
    print(
        "4. every committed order was charged exactly once; declined orders left no trace"
        if ok
        else "4. UNEXPECTED: the numbers above do not add up"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
