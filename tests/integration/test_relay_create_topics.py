"""The relay creates Kafka topics it publishes to (``--create-topics``), once each."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from postroom.brokers.kafka import KafkaPublisher
from postroom.brokers.kafka.topics import TopicCreator
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.support.apps import delete_kafka_topics, kafka_topics
from tests.support.database import count
from tests.support.processes import RelayFleet
from tests.support.services import KAFKA_BOOTSTRAP
from tests.support.waiting import wait_until_sync
from tests.support.writing import commit


@pytest.fixture
def topics(kafka: str) -> Iterator[list[str]]:
    """Two fresh topic names, deleted after the test."""
    names = [f"created-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    yield names
    delete_kafka_topics(KAFKA_BOOTSTRAP, names)


async def test_the_creator_makes_a_missing_topic_before_anything_is_produced(
    topics: list[str],
) -> None:
    creator = TopicCreator(KAFKA_BOOTSTRAP, {})
    with capture_logs() as logs:
        await creator.ensure([topics[0]])
        await creator.ensure([topics[0]])  # remembered: not created (or asked for) again
    assert topics[0] in kafka_topics(KAFKA_BOOTSTRAP)
    assert [log["topic"] for log in logs if log["event"] == "topic created"] == [topics[0]]


async def test_a_publisher_with_create_topics_creates_each_topic_once(topics: list[str]) -> None:
    publisher = KafkaPublisher(KAFKA_BOOTSTRAP, create_topics=True)
    try:
        with capture_logs() as logs:
            for _ in range(2):
                batch = [Message.create(topic, {"n": 1}, key="k") for topic in topics]
                results = await publisher.publish(batch)
                assert [result.confirmed for result in results] == [True, True]
    finally:
        await publisher.close()
    created = sorted(log["topic"] for log in logs if log["event"] == "topic created")
    assert created == sorted(topics)


def test_relay_process_with_create_topics_creates_the_topic_and_publishes(
    database_url: str, tables: Tables, engine: Engine, topics: list[str], tmp_path: Path
) -> None:
    outbox = Outbox(tables)
    fleet = RelayFleet(database_url, schema=str(tables.schema), log_dir=tmp_path)
    try:
        relay = fleet.start(broker_url=f"kafka://{KAFKA_BOOTSTRAP}", extra_args=["--create-topics"])
        relay.wait_ready()
        commit(engine, outbox, [Message.create(topics[1], {"order": 1}, key="a")])
        published = f"SELECT count(*) FROM {quoted_table(tables.outbox)} WHERE status = 'published'"
        wait_until_sync(
            lambda: count(engine, published) == 1,
            within=30,
            what="the row published",
            watch=relay.check_alive,
        )
        assert [event["topic"] for event in relay.events("topic created")] == [topics[1]]
        assert topics[1] in kafka_topics(KAFKA_BOOTSTRAP)
        assert relay.terminate() == 0
    finally:
        fleet.stop_all()
