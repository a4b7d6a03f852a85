"""A message whose handler kills the ``postroom consume`` process is counted, then dead-lettered.

The test plays the orchestrator: each time the process dies it starts a new one. The poison
message must end on the dead-letter queue/topic with "the consumer process ended N times",
the other messages must be handled exactly once, and the last process must stay up.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.brokers import dead_letters_from_url
from postroom.message import Message
from postroom.schema import Tables
from tests.support.consuming import KAFKA_GROUP_SETTINGS, publish
from tests.support.database import count
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import create_topics, delete_consumer_queues
from tests.support.services import (
    AMQP_URL,
    KAFKA_BOOTSTRAP,
    KAFKA_URL,
    kafka_available,
    rabbitmq_available,
)

HANDLERS = textwrap.dedent(
    """
    import os

    from sqlalchemy import text

    import postroom

    consumer = postroom.Consumer(os.environ["TEST_CONSUMER"])
    EFFECTS = os.environ["TEST_EFFECTS"]


    @consumer.handler(os.environ["TEST_TOPIC"])
    def apply(message, session):
        if message.payload.get("poison"):
            os._exit(1)  # as a segfault or an OOM kill would end it
        session.execute(
            text(f"INSERT INTO {EFFECTS} (message_id) VALUES (:id)"), {"id": str(message.id)}
        )
    """
)

MAX_ATTEMPTS = 2


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
async def test_a_message_that_kills_the_process_is_dead_lettered_after_max_attempts(
    broker: str, database_url: str, tables: Tables, engine: Engine, tmp_path: Path
) -> None:
    name = f"crash-{uuid.uuid4().hex[:8]}"
    topic = f"crashing-{uuid.uuid4().hex[:8]}"
    if broker == "rabbitmq":
        rabbitmq_available()
        url = AMQP_URL
    else:
        kafka_available()
        url = f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}"
        create_topics(KAFKA_BOOTSTRAP, [topic], partitions=1)
    effects = f'"{tables.schema}".effects'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {effects} (message_id text)"))
    (tmp_path / "crash_handlers.py").write_text(HANDLERS)
    env = {
        "TEST_CONSUMER": name,
        "TEST_TOPIC": topic,
        "TEST_EFFECTS": effects,
        "POSTROOM_CONSUMER_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "POSTROOM_CONSUMER_PREFETCH": "1",
        "POSTROOM_CONSUMER_CONCURRENCY": "1",
    }
    fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")

    def start() -> ServiceProcess:
        return fleet.start_consumer(
            "crash_handlers:consumer", broker_url=url, env=env, pythonpath=str(tmp_path)
        )

    poison = Message.create(topic, {"poison": True}, key="one")
    good = [Message.create(topic, {"n": n}, key="one") for n in range(4)]
    try:
        process = start()
        process.wait_ready(60)
        # One key: on Kafka one partition, in this order; on RabbitMQ one queue.
        await publish(url, [good[0], good[1], poison, good[2], good[3]])
        deaths = 0
        deadline = time.monotonic() + 180
        while not (
            process.events("consumer.dead_lettered")
            and count(engine, f"SELECT count(*) FROM {effects}") >= len(good)
        ):
            assert time.monotonic() < deadline, fleet.tails()
            if not process.alive:
                assert process.returncode == 1, process.tail()
                deaths += 1
                assert deaths <= MAX_ATTEMPTS + 3, f"still crash-looping:\n{fleet.tails()}"
                process = start()  # as an orchestrator restarts it
            await asyncio.sleep(0.2)
        # The first run plus MAX_ATTEMPTS counted runs (Kafka: maybe one more, whose
        # predecessor's offset commit died with the process).
        assert MAX_ATTEMPTS + 1 <= deaths <= MAX_ATTEMPTS + 2, fleet.tails()
        (event,) = process.events("consumer.dead_lettered")
        assert "the consumer process ended" in event["error"]
        assert process.alive
        process.wait_ready(30)
        await asyncio.sleep(1.0)
        assert process.alive, "the consumer died after the poison message was dead-lettered"
        assert process.terminate(30) == 0, process.tail()
        listing = await dead_letters_from_url(url, name).browse(None)
    finally:
        fleet.stop_all()
        if broker == "rabbitmq":
            await delete_consumer_queues(AMQP_URL, name)
    with engine.connect() as connection:
        handled = connection.execute(text(f"SELECT message_id FROM {effects}")).scalars().all()
    assert sorted(handled) == sorted(str(m.id) for m in good), "handled exactly once each"
    (letter,) = listing.letters
    assert letter.id == str(poison.id)
    assert letter.error is not None
    assert letter.error.startswith(f"the consumer process ended {letter.attempts} times")
    assert letter.attempts is not None
    assert letter.attempts > MAX_ATTEMPTS
    assert letter.topic == topic
    attempts_left = count(
        engine,
        f'SELECT count(*) FROM "{tables.schema}".inbox_attempts WHERE consumer = :c '
        "AND message_id = :m",
        c=name,
        m=str(poison.id),
    )
    assert attempts_left == 0, "the count of a dead-lettered message is cleared"


pytestmark = pytest.mark.timeout(300)
