"""``postroom consume`` on Kafka as a real process: a topic created after the consumer
started is reported, then picked up; a 2 MB record over the consumer's limit is
dead-lettered without its body and the partition moves on."""

from __future__ import annotations

import asyncio
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.brokers.base import HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC
from postroom.message import HEADER_ID, Message
from postroom.schema import Tables
from tests.support.consuming import KAFKA_GROUP_SETTINGS, publish
from tests.support.database import count
from tests.support.network import free_port, http_get
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import create_topics, read_kafka
from tests.support.services import KAFKA_BOOTSTRAP, KAFKA_URL, kafka_available
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

HANDLERS = textwrap.dedent(
    """
    import os

    from sqlalchemy import text

    import postroom

    consumer = postroom.Consumer(os.environ["TEST_CONSUMER"])
    EFFECTS = os.environ["TEST_EFFECTS"]


    @consumer.handler(os.environ["TEST_TOPIC"])
    def apply(message, session):
        session.execute(
            text(f"INSERT INTO {EFFECTS} (message_id) VALUES (:id)"), {"id": str(message.id)}
        )
    """
)


class Setup:
    """A consumer module, its effects table and a fleet to start it from."""

    def __init__(self, database_url: str, tables: Tables, engine: Engine, tmp_path: Path) -> None:
        kafka_available()
        self.name = f"kafka-hard-{uuid.uuid4().hex[:8]}"
        self.topic = f"late-{uuid.uuid4().hex[:8]}"
        self.engine = engine
        self.effects = f'"{tables.schema}".effects'
        with engine.begin() as connection:
            connection.execute(text(f"CREATE TABLE {self.effects} (message_id text)"))
        (tmp_path / "kafka_handlers.py").write_text(HANDLERS)
        self.tmp_path = tmp_path
        self.env = {"TEST_CONSUMER": self.name, "TEST_TOPIC": self.topic}
        self.env["TEST_EFFECTS"] = self.effects
        self.fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path / "logs")
        self.url = f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}"

    def start(self, *extra: str, **env: str) -> ServiceProcess:
        return self.fleet.start_consumer(
            "kafka_handlers:consumer",
            broker_url=self.url,
            env={**self.env, **env},
            pythonpath=str(self.tmp_path),
            extra_args=extra,
        )

    def handled(self) -> int:
        return count(self.engine, f"SELECT count(*) FROM {self.effects}")


@pytest.fixture
def setup(database_url: str, tables: Tables, engine: Engine, tmp_path: Path) -> Setup:
    return Setup(database_url, tables, engine, tmp_path)


async def test_a_topic_created_after_the_consumer_started_is_reported_then_consumed(
    setup: Setup,
) -> None:
    port = free_port()
    process = setup.start("--metrics-port", str(port))
    try:
        await process.wait_ready_async(60)
        await process.wait_for_async("subscribed topics do not exist", within=30)
        (warning,) = process.events("subscribed topics do not exist")
        assert warning["topics"] == [setup.topic]
        assert http_get(port, "/readyz")[0] == 503, "ready while its topic does not exist"
        assert http_get(port, "/healthz")[0] == 200

        create_topics(KAFKA_BOOTSTRAP, [setup.topic], partitions=1)
        created = time.monotonic()
        await publish(setup.url, [Message.create(setup.topic, {"late": True})])
        await wait_until(
            lambda: setup.handled() == 1,
            within=30,
            what="the message on the topic created after the consumer",
            watch=process.check_alive,
        )
        picked_up = time.monotonic() - created
        await wait_until(lambda: http_get(port, "/readyz")[0] == 200, within=15, what="/readyz 200")
        assert picked_up < 30
        assert process.terminate(30) == 0, process.tail()
    finally:
        setup.fleet.stop_all()


async def test_a_2mb_record_over_the_limit_is_dead_lettered_bodyless_and_the_partition_moves_on(
    setup: Setup,
) -> None:
    from confluent_kafka import Producer

    create_topics(KAFKA_BOOTSTRAP, [setup.topic, f"{setup.name}.dead-letter"], partitions=1)
    producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "message.max.bytes": 4 << 20})
    poison_id = str(uuid.uuid4())
    body = b'{"blob": "' + b"\xff" * (2 << 20) + b'"}'  # 2 MB, and not UTF-8 either
    producer.produce(
        setup.topic,
        value=body,
        headers=[(HEADER_ID, poison_id), ("content-type", "application/json")],
    )
    assert await asyncio.to_thread(producer.flush, 20) == 0
    later = [Message.create(setup.topic, {"n": n}) for n in range(3)]
    await publish(setup.url, later)
    process = setup.start(POSTROOM_CONSUMER_MAX_MESSAGE_BYTES=str(1 << 20))
    try:
        await process.wait_ready_async(60)
        await wait_until(
            lambda: setup.handled() == len(later),
            within=60,
            what="the records after the 2 MB one",
            watch=process.check_alive,
        )
        (letter,) = await read_kafka(KAFKA_BOOTSTRAP, f"{setup.name}.dead-letter", 1)
        assert process.terminate(30) == 0, process.tail()
    finally:
        setup.fleet.stop_all()
    assert letter.body == b""
    assert letter.headers[HEADER_ERROR].startswith("message of ")
    assert f"exceeds consumer_max_message_bytes {1 << 20}" in letter.headers[HEADER_ERROR]
    assert letter.headers[HEADER_TOPIC] == setup.topic
    assert (letter.headers[HEADER_PARTITION], letter.headers[HEADER_OFFSET]) == ("0", "0")
