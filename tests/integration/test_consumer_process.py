"""``postroom consume`` as a real process: SIGKILL between the handler's write and its commit."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.brokers.rabbitmq import RabbitMQPublisher
from postroom.message import Message
from postroom.schema import Tables
from tests.support.database import count
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import delete_consumer_queues
from tests.support.services import AMQP_URL, rabbitmq_available
from tests.support.waiting import wait_until_sync

HANDLERS = textwrap.dedent(
    """
    import os
    import pathlib
    import time

    from sqlalchemy import text

    import postroom

    consumer = postroom.Consumer(os.environ["TEST_CONSUMER"])
    EFFECTS = os.environ["TEST_EFFECTS"]
    MARK = pathlib.Path(os.environ["TEST_MARK"])


    @consumer.handler(os.environ["TEST_TOPIC"])
    def apply(message, session):
        session.execute(
            text(f"INSERT INTO {EFFECTS} (message_id) VALUES (:id)"), {"id": str(message.id)}
        )
        session.flush()  # the write reached PostgreSQL, uncommitted
        if not MARK.exists():
            MARK.write_text("written, not committed")
            time.sleep(600)  # killed here
    """
)


async def test_consumer_killed_before_commit_processes_the_message_once_after_restart(
    database_url: str, tables: Tables, engine: Engine, tmp_path: Path
) -> None:
    rabbitmq_available()
    name = f"killed-{uuid.uuid4().hex[:8]}"
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    effects = f'"{tables.schema}".effects'
    inbox = f'"{tables.schema}".inbox'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {effects} (message_id text)"))
    (tmp_path / "kill_handlers.py").write_text(HANDLERS)
    mark = tmp_path / "mark"
    env = {"TEST_CONSUMER": name, "TEST_TOPIC": topic, "TEST_EFFECTS": effects}
    env["TEST_MARK"] = str(mark)

    fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")

    def start() -> ServiceProcess:
        return fleet.start_consumer(
            "kill_handlers:consumer", broker_url=AMQP_URL, env=env, pythonpath=str(tmp_path)
        )

    publisher = RabbitMQPublisher(AMQP_URL)
    try:
        first = start()
        first.wait_ready(30)
        message = Message.create(topic, {"order": 42})
        assert (await publisher.publish([message]))[0].confirmed
        wait_until_sync(mark.exists, within=30, what="the handler's write", watch=first.check_alive)
        first.kill()
        # Nothing of the killed run committed: no effect, no inbox row.
        assert count(engine, f"SELECT count(*) FROM {effects}") == 0
        assert count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name) == 0

        second = start()
        done = f"SELECT count(*) FROM {effects}"
        wait_until_sync(
            lambda: count(engine, done) == 1,
            within=30,
            what="the redelivered message",
            watch=second.check_alive,
        )
        # A duplicate delivery after the restart changes nothing.
        assert (await publisher.publish([message]))[0].confirmed
        second.wait_for("consumer.duplicate", within=15)
        assert second.terminate(30) == 0, second.tail(60)
    finally:
        await publisher.close()
        fleet.stop_all()
        await delete_consumer_queues(AMQP_URL, name)
    assert count(engine, f"SELECT count(*) FROM {effects}") == 1
    assert count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name) == 1
    assert second.events("consumer.stopped")


pytestmark = pytest.mark.timeout(120)
