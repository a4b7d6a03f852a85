"""postroom demo: the whole path, end to end, against the real services.

1. Orders are written with their message in one transaction; declined ones roll back,
   and their message vanishes with them.
2. The relay publishes the committed messages to RabbitMQ and marks them published once
   RabbitMQ confirms.
3. A billing consumer charges each order in a transaction that also records the message
   in its inbox and enqueues a follow-up message. RabbitMQ then delivers one message a
   second time (as brokers do after a lost acknowledgement): the inbox skips it.
4. A summary shows every committed order charged exactly once.

Run with `make demo` (it starts the services and creates postroom's tables first).
"""

from __future__ import annotations

import asyncio
import dataclasses
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


async def run_pipeline(settings: postroom.Settings, run: str, committed: list[int]) -> int:
    """Relay and consumer until every committed order is charged; return duplicates seen."""
    import aio_pika

    from postroom.brokers import publisher_from_url, subscriber_from_url
    from postroom.consumer.runner import ConsumerService
    from postroom.relay import Relay

    amqp_url = os.environ.get("POSTROOM_TEST_AMQP_URL", settings.broker_url)
    settings = dataclasses.replace(settings, metrics_port=0, relay_poll_interval=0.2)
    consumer = billing_consumer(run)
    consumer.configure(settings)
    service = ConsumerService(
        consumer, subscriber_from_url(amqp_url, prefetch=settings.consumer_prefetch), settings
    )
    consuming = asyncio.create_task(service.run())
    await asyncio.wait_for(service.started.wait(), 30)  # its queue is bound: messages route
    relay = Relay(settings, publisher_from_url(amqp_url))
    relaying = asyncio.create_task(relay.run())
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange("postroom", aio_pika.ExchangeType.TOPIC, durable=True)
    notifications = await channel.declare_queue(f"demo-notifications-{run}", exclusive=True)
    await notifications.bind(exchange, "charges.made")  # where the follow-ups go
    try:
        await _until(lambda: len(delivered) >= len(committed))
        # The same message is published a second time, as a relay does when it crashed
        # after the broker's confirm but before marking the row: the inbox must skip it.
        again = delivered[0]
        await exchange.publish(
            aio_pika.Message(
                again.body,
                message_id=str(again.id),
                content_type=again.content_type,
                headers=again.wire_headers(),
            ),
            routing_key=again.topic,
        )
        await _until(lambda: _counted(service) >= 1)
        await asyncio.sleep(0.5)  # the relay records the follow-ups' confirmations
    finally:
        relay.stop()
        service.stop()
        await asyncio.gather(relaying, consuming)
        for queue in (consumer.name, f"{consumer.name}.dead-letter"):
            await channel.queue_delete(queue)
        await connection.close()
    return _counted(service)


async def _until(check: Any, seconds: float = 60.0) -> None:
    """Wait until ``check()`` is true; fail after ``seconds``."""
    for _ in range(int(seconds * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the demo did not finish in time")


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
    committed = place_orders(engine, run, first_id)
    outbox = tables_for(settings).outbox
    this_run = outbox.c.headers["demo-run"].astext == run
    with engine.connect() as connection:
        written = connection.execute(select(func.count()).where(this_run)).scalar_one()
    print(
        f"1. {ORDERS} orders placed: {len(committed)} committed, "
        f"{ORDERS - len(committed)} declined and rolled back; outbox rows: {written}"
    )

    duplicates = asyncio.run(run_pipeline(settings, run, committed))
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
    print(f"2. relay: {published} of {written} messages confirmed by RabbitMQ and marked published")
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
