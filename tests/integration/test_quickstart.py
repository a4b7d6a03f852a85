"""The README's Quickstart runs exactly as written, on RabbitMQ and on Kafka.

Its code blocks and commands are read from README.md, so an edit that breaks the
walk-through fails here. Only the connection URLs are replaced: a database and a RabbitMQ
virtual host (or a Kafka-compatible broker) of this run's own. The relay and the consumer
run as real processes on their default metrics ports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from sqlalchemy import text

from postroom.config import DEFAULT_METRICS_PORTS
from postroom.database import create_engine
from tests.support.network import http_get, listens
from tests.support.processes import TansuBroker
from tests.support.quickstart import Walkthrough, fresh_database, fresh_vhost, read_quickstart
from tests.support.readback import KafkaReadback
from tests.support.waiting import wait_until_sync

pytestmark = pytest.mark.timeout(150)


@contextlib.contextmanager
def private_kafka(binary: str, log_dir: Path) -> Iterator[str]:
    """A Kafka-compatible broker of this run's own (empty, in memory); its URL."""
    broker = TansuBroker(binary, log_path=log_dir / "tansu.log").start()
    try:
        yield broker.url
    finally:
        broker.ensure_stopped()


def test_the_quickstart_has_what_the_walkthrough_needs() -> None:
    quickstart = read_quickstart()
    assert set(quickstart.files) == {"shop.py", "place_order.py"}
    commands = [step.command for step in quickstart.steps]
    order = ["postroom db upgrade", "postroom broker setup", "python place_order.py"]
    positions = [next(i for i, c in enumerate(commands) if c.startswith(o)) for o in order]
    assert positions == sorted(positions), commands
    background = [step.command for step in quickstart.steps if step.background]
    assert background == ["postroom relay", "postroom consume shop:consumer"]
    assert all("--metrics-port" not in command for command in commands)


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
def test_the_quickstart_runs_as_written(
    broker: str, database_url: str, rabbitmq: str, tansu: str, tmp_path: Path
) -> None:
    ports = list(DEFAULT_METRICS_PORTS.values())
    taken = [port for port in ports if listens(port)]
    assert not taken, f"ports {taken} are taken on this host; stop what listens there"
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(fresh_database(database_url))
        if broker == "rabbitmq":
            broker_url = stack.enter_context(fresh_vhost(rabbitmq))
        else:
            broker_url = stack.enter_context(private_kafka(tansu, tmp_path))
        walk = Walkthrough(
            read_quickstart(), tmp_path / "app", database_url=database, broker_url=broker_url
        )
        stack.callback(walk.kill_all)
        walk.run()
        relay, consumer = walk.processes["postroom relay"], walk.processes["postroom consume"]
        engine = create_engine(database)
        stack.callback(engine.dispose)

        def receipt_sent() -> bool:
            relay.check_alive()
            consumer.check_alive()
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT order_id, receipt_sent FROM charges"))
                return rows.all() == [(42, True)]

        wait_until_sync(
            receipt_sent, within=60, what="order 42 charged, its receipt sent\n" + walk.tails()
        )
        # Both services serve their metrics on their own default ports, side by side.
        relay_status, relay_metrics = http_get(DEFAULT_METRICS_PORTS["relay"], "/metrics")
        consumer_status, consumer_metrics = http_get(DEFAULT_METRICS_PORTS["consumer"], "/metrics")
        assert (relay_status, consumer_status) == (200, 200)
        assert "postroom_relay_published_total" in relay_metrics
        assert "postroom_consumer_handled_total" in consumer_metrics

        with engine.connect() as connection:
            states = connection.execute(
                text("SELECT topic, status, attempts FROM postroom.outbox ORDER BY position")
            ).all()
            inbox = connection.execute(text("SELECT count(*) FROM postroom.inbox")).scalar()
        # Both messages published at the first attempt: nothing was unroutable or dead.
        assert states == [("orders.created", "published", 0), ("charges.made", "published", 0)]
        assert inbox == 2
        assert relay.events("relay.publish_failed") == []
        assert walk.stop() == {"postroom relay": 0, "postroom consume": 0}
        assert dead_letters(broker, broker_url) == 0


def dead_letters(broker: str, broker_url: str) -> int:
    """How many messages are in ``billing.dead-letter`` (queue or topic)."""
    if broker == "rabbitmq":
        import asyncio

        return asyncio.run(_queue_depth(broker_url, "billing.dead-letter"))
    bootstrap = broker_url.removeprefix("kafka://")
    with KafkaReadback(bootstrap, ["billing.dead-letter"], create=False) as readback:
        # Read from the beginning for a while: an empty topic delivers nothing.
        with contextlib.suppress(AssertionError):
            readback.wait_for_ids_sync(["none"], within=3)
        return readback.count


async def _queue_depth(url: str, queue: str) -> int:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
