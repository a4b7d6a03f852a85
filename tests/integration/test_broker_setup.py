"""``postroom broker setup``: what a consumer needs, declared ahead of time on the real brokers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from postroom.brokers.kafka import KafkaPublisher
from postroom.brokers.rabbitmq import RabbitMQPublisher, RabbitMQSubscriber
from postroom.message import Message
from tests.support.apps import app_env, delete_kafka_topics, kafka_topics, write_consumer_app
from tests.support.cli import run_postroom
from tests.support.readback import delete_consumer_queues, drain_queue
from tests.support.services import KAFKA_BOOTSTRAP


@pytest.fixture
def names() -> tuple[str, list[str]]:
    """A fresh consumer name and its two topics."""
    tag = uuid.uuid4().hex[:8]
    return f"setup-{tag}", [f"orders-{tag}.created", f"orders-{tag}.paid"]


def setup_command(
    app: Path, consumer: str, topics: list[str], broker_url: str, *flags: str
) -> tuple[int, list[str], str]:
    """Run ``postroom broker setup`` for the app; its exit code, stdout lines and stderr."""
    result = run_postroom(
        "broker",
        "setup",
        "setup_app:consumer",
        "--broker-url",
        broker_url,
        *flags,
        env=app_env(app, consumer, topics),
        clean=True,
    )
    return result.returncode, result.stdout.splitlines(), result.stderr


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A directory holding ``setup_app``, the consumer the commands set up."""
    write_consumer_app(tmp_path / "app", "setup_app")
    return tmp_path / "app"


async def queue_exists(url: str, name: str) -> bool:
    """A passive declare: whether queue ``name`` exists (declares nothing)."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True


@pytest.fixture
async def rabbitmq_names(
    rabbitmq: str, names: tuple[str, list[str]]
) -> AsyncIterator[tuple[str, list[str]]]:
    """``names``, whose queues are deleted after the test."""
    yield names
    await delete_consumer_queues(rabbitmq, names[0])


async def test_rabbitmq_dry_run_declares_nothing(
    rabbitmq: str, app: Path, rabbitmq_names: tuple[str, list[str]]
) -> None:
    consumer, topics = rabbitmq_names
    code, lines, stderr = setup_command(app, consumer, topics, rabbitmq, "--dry-run")
    assert code == 0, stderr
    assert f"queue {consumer}: would create" in lines
    assert f"binding postroom -> {consumer} ({topics[0]}): would create" in lines
    assert f"queue {consumer}.dead-letter: would create" in lines
    assert "dry run: nothing was declared" in stderr
    assert not await queue_exists(rabbitmq, consumer)
    assert not await queue_exists(rabbitmq, f"{consumer}.dead-letter")
    assert not await queue_exists(rabbitmq, f"{consumer}.retry.512ms")


async def test_rabbitmq_setup_twice_then_a_relay_publish_reaches_the_queue(
    rabbitmq: str, app: Path, rabbitmq_names: tuple[str, list[str]]
) -> None:
    consumer, topics = rabbitmq_names
    code, first, stderr = setup_command(app, consumer, topics, rabbitmq)
    assert code == 0, stderr
    assert first[0] in {"exchange postroom: exists", "exchange postroom: created"}
    assert f"queue {consumer}: created" in first
    assert [line for line in first if line.startswith("binding")] == [
        f"binding postroom -> {consumer} ({topic}): created" for topic in topics
    ]
    # The default backoff (1 s doubling to 60 s, 5 attempts) waits 0.5 s to 8 s.
    assert [line for line in first if ".retry." in line] == [
        f"queue {consumer}.retry.{ms}ms: created" for ms in (512, 1024, 2048, 4096, 8192)
    ]
    assert first[-1] == f"queue {consumer}.dead-letter: created"

    code, second, stderr = setup_command(app, consumer, topics, rabbitmq)
    assert code == 0, stderr
    # A binding on a queue that existed is "bound": AMQP cannot tell whether it was there.
    assert second == [
        line.replace(": created", ": bound" if line.startswith("binding") else ": exists")
        for line in first
    ]
    assert "warning" not in stderr

    # The relay's publisher, with mandatory: routed to the queue, not returned as NO_ROUTE.
    message = Message.create(topics[1], {"order": 7})
    publisher = RabbitMQPublisher(rabbitmq)
    try:
        (result,) = await publisher.publish([message])
    finally:
        await publisher.close()
    assert result.confirmed, result.error
    taken = await drain_queue(rabbitmq, consumer)
    assert [delivered.id for delivered in taken] == [str(message.id)]

    # The subscriber declares the same objects with the same arguments: it starts on them.
    subscriber = RabbitMQSubscriber(rabbitmq)
    try:
        await subscriber.start(consumer, topics)
        assert await subscriber._retry_queue(0.7) == f"{consumer}.retry.1024ms"
    finally:
        await subscriber.close()


def test_rabbitmq_unreachable_exits_3_and_a_bad_target_exits_2(
    app: Path, names: tuple[str, list[str]]
) -> None:
    consumer, topics = names
    code, lines, stderr = setup_command(app, consumer, topics, "amqp://guest:guest@127.0.0.1:1/")
    assert code == 3
    assert lines == []
    assert stderr.startswith("error: cannot reach RabbitMQ at 127.0.0.1:1")
    assert "Traceback" not in stderr
    result = run_postroom("broker", "setup", "no_such_module:consumer", clean=True)
    assert result.returncode == 3  # not found, as `postroom consume` says it
    assert "cannot find module 'no_such_module'" in result.stderr
    result = run_postroom("broker", "setup", "setup_app", env=app_env(app, consumer, topics))
    assert result.returncode == 2
    assert "is not module:attribute" in result.stderr


@pytest.fixture
def kafka_names(kafka: str, names: tuple[str, list[str]]) -> Iterator[tuple[str, list[str]]]:
    """``names``, whose topics are deleted after the test."""
    yield names
    delete_kafka_topics(KAFKA_BOOTSTRAP, [*names[1], f"{names[0]}.dead-letter"])


async def test_kafka_dry_run_then_setup_twice_then_publish(
    kafka: str, app: Path, kafka_names: tuple[str, list[str]]
) -> None:
    consumer, topics = kafka_names
    url = f"kafka://{KAFKA_BOOTSTRAP}"
    wanted = [*topics, f"{consumer}.dead-letter"]

    code, lines, stderr = setup_command(app, consumer, topics, url, "--dry-run")
    assert code == 0, stderr
    assert lines == [f"topic {topic}: would create" for topic in wanted]
    assert not set(wanted) & set(kafka_topics(KAFKA_BOOTSTRAP))

    code, lines, stderr = setup_command(app, consumer, topics, url, "--partitions", "2")
    assert code == 0, stderr
    assert lines == [f"topic {topic}: created" for topic in wanted]
    existing = kafka_topics(KAFKA_BOOTSTRAP)
    assert [existing.get(topic) for topic in wanted] == [2, 2, 2]

    code, lines, stderr = setup_command(app, consumer, topics, url, "--partitions", "3")
    assert code == 0, stderr
    assert lines == [f"topic {topic}: exists" for topic in wanted]
    assert f"warning: topic '{topics[0]}' has 2 partitions, not 3" in stderr
    assert [kafka_topics(KAFKA_BOOTSTRAP).get(topic) for topic in wanted] == [2, 2, 2]

    publisher = KafkaPublisher(KAFKA_BOOTSTRAP)
    try:
        (result,) = await publisher.publish([Message.create(topics[0], {"order": 7}, key="k")])
    finally:
        await publisher.close()
    assert result.confirmed, result.error


def test_kafka_unreachable_exits_3(app: Path, names: tuple[str, list[str]]) -> None:
    consumer, topics = names
    code, lines, stderr = setup_command(app, consumer, topics, "kafka://127.0.0.1:1")
    assert code == 3
    assert lines == []
    assert stderr.startswith("error: cannot reach Kafka at 127.0.0.1:1")
