"""``postroom consume`` as a real process: SIGKILL between the handler's write and its commit."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.brokers.rabbitmq import RabbitMQPublisher
from postroom.message import Message
from postroom.schema import Tables
from tests.contract.harness import AMQP_URL
from tests.integration.test_consumer import rabbitmq_available
from tests.support.processes import _die_with_parent, postroom_command
from tests.support.readback import delete_consumer_queues

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


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


def wait_for(
    check: Any, within: float, what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + within
    while not check():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{what} did not happen\n" + log.read_text(errors="replace")[-4000:]
            )
        time.sleep(0.05)


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(
        PYTHONPATH=str(tmp_path),
        PYTHONUNBUFFERED="1",
        TEST_CONSUMER=name,
        TEST_TOPIC=topic,
        TEST_EFFECTS=effects,
        TEST_MARK=str(mark),
    )
    command = [
        *postroom_command(),
        "consume",
        "kill_handlers:consumer",
        "--database-url",
        database_url,
        "--schema",
        str(tables.schema),
        "--broker-url",
        AMQP_URL,
        "--metrics-port",
        "0",
        "--log-format",
        "json",
    ]

    def start(log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),
                cwd=tmp_path,
            )

    log = tmp_path / "consumer.log"
    first = start(log)
    second: subprocess.Popen[bytes] | None = None
    publisher = RabbitMQPublisher(AMQP_URL)
    try:
        wait_for(lambda: '"consumer.ready"' in log.read_text(), 30, "subscribe", first, log)
        message = Message.create(topic, {"order": 42})
        assert (await publisher.publish([message]))[0].confirmed
        wait_for(mark.exists, 30, "the handler's write", first, log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # Nothing of the killed run committed: no effect, no inbox row.
        assert count(engine, f"SELECT count(*) FROM {effects}") == 0
        assert count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name) == 0

        second = start(log)
        done = f"SELECT count(*) FROM {effects}"
        wait_for(lambda: count(engine, done) == 1, 30, "the redelivered message", second, log)
        # A duplicate delivery after the restart changes nothing.
        assert (await publisher.publish([message]))[0].confirmed
        wait_for(lambda: '"consumer.duplicate"' in log.read_text(), 15, "duplicate", second, log)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, log.read_text()[-3000:]
    finally:
        await publisher.close()
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        await delete_consumer_queues(AMQP_URL, name)
    assert count(engine, f"SELECT count(*) FROM {effects}") == 1
    assert count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name) == 1
    assert '"consumer.stopped"' in log.read_text()


pytestmark = pytest.mark.timeout(120)
