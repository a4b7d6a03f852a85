"""postroom demo: an order and its message commit together, or not at all; then the relay
publishes the committed message to RabbitMQ, and only marks it published once confirmed.

Run with `make demo` (which starts the services and creates postroom's tables first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import uuid

from sqlalchemy import Column, Integer, MetaData, Numeric, Table, Text, select, text
from sqlalchemy.orm import Session

import postroom
from postroom.database import create_engine
from postroom.log import configure_logging

metadata = MetaData(schema="postroom_demo")
orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("customer", Text, nullable=False),
    Column("total", Numeric(10, 2), nullable=False),
    Column("run", Text, nullable=False),
)


class PaymentDeclined(Exception):
    """The business rule that makes the second order fail."""


def place_order(session: Session, order_id: int, customer: str, total: str, run: str) -> None:
    """Insert the order and enqueue its event in the caller's transaction."""
    session.execute(orders.insert().values(id=order_id, customer=customer, total=total, run=run))
    postroom.enqueue(
        session,
        "orders.created",
        {"order_id": order_id, "customer": customer, "total": total},
        key=f"customer-{customer}",
        headers={"demo-run": run},
    )
    if customer == "mallory":
        raise PaymentDeclined(f"card of {customer} declined")


def main() -> int:
    """Place one good and one failing order, then show what the database holds."""
    configure_logging(level="warning")
    settings = postroom.Settings.from_env()
    engine = create_engine(settings.database_url)
    run = uuid.uuid4().hex[:8]
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS postroom_demo"))
        metadata.create_all(connection)
        base = connection.execute(text("SELECT coalesce(max(id), 0) FROM postroom_demo.orders"))
        first_id = int(base.scalar_one()) + 1

    print(f"demo run {run}")
    with Session(engine) as session:
        place_order(session, first_id, "alice", "42.00", run)
        session.commit()
    print(f"  order {first_id} (alice): committed")
    try:
        with Session(engine) as session:
            place_order(session, first_id + 1, "mallory", "13.37", run)
            session.commit()
    except PaymentDeclined as declined:
        print(f"  order {first_id + 1} (mallory): rolled back ({declined})")

    outbox = settings.tables().outbox
    with engine.connect() as connection:
        order_ids = (
            connection.execute(select(orders.c.id).where(orders.c.run == run).order_by(orders.c.id))
            .scalars()
            .all()
        )
        messages = connection.execute(
            select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.payload, outbox.c.status)
            .where(outbox.c.headers["demo-run"].astext == run)
            .order_by(outbox.c.position)
        ).all()
    print(f"  orders table:  {list(order_ids)}")
    for message in messages:
        print(
            f"  outbox row:    {message.topic} key={message.key} status={message.status} "
            f"payload={bytes(message.payload).decode()}"
        )
    ok = list(order_ids) == [first_id] and len(messages) == 1
    print(
        "atomic write holds: the committed order has its message, the rolled-back one has none"
        if ok
        else "UNEXPECTED: orders and outbox rows disagree"
    )
    delivered = asyncio.run(relay_to_rabbitmq(settings, run))
    with engine.connect() as connection:
        status = connection.execute(
            select(outbox.c.status).where(outbox.c.headers["demo-run"].astext == run)
        ).scalar_one()
    engine.dispose()
    print(f"  outbox row is now: {status}")
    ok = ok and delivered == [first_id] and status == "published"
    print(
        "relay holds: the committed order's message reached RabbitMQ, confirmed and marked"
        if ok
        else "UNEXPECTED: the relay did not deliver exactly the committed message"
    )
    return 0 if ok else 1


async def relay_to_rabbitmq(settings: postroom.Settings, run: str) -> list[int]:
    """Run a relay until this run's message arrives on a queue bound to orders.created."""
    import aio_pika

    from postroom.brokers import publisher_from_url
    from postroom.relay import Relay

    amqp_url = os.environ.get("POSTROOM_TEST_AMQP_URL", settings.broker_url)
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange("postroom", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"postroom-demo-{run}", exclusive=True)
    await queue.bind(exchange, "orders.created")
    relay_settings = dataclasses.replace(settings, metrics_port=0, relay_poll_interval=0.2)
    relay = Relay(relay_settings, publisher_from_url(amqp_url))
    task = asyncio.create_task(relay.run())
    delivered: list[int] = []
    try:
        async with asyncio.timeout(30), queue.iterator() as messages:
            async for incoming in messages:
                await incoming.ack()
                if incoming.headers.get("demo-run") == run:
                    payload = json.loads(incoming.body)
                    delivered.append(payload["order_id"])
                    print(
                        f"  from RabbitMQ: {incoming.routing_key} id={incoming.message_id} "
                        f"payload={incoming.body.decode()}"
                    )
                    break
        await asyncio.sleep(0.5)  # let the relay record the broker's confirmation
    finally:
        relay.stop()
        await task
        await connection.close()
    return delivered


if __name__ == "__main__":
    sys.exit(main())
