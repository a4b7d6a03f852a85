"""Fixtures of the contract suite: every test runs against memory, RabbitMQ and Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from postroom.brokers import Publisher
from postroom.brokers.memory import MemoryBroker
from tests.contract.harness import (
    Harness,
    KafkaHarness,
    MemoryHarness,
    Outage,
    RabbitMQHarness,
    called,
    in_thread,
)
from tests.support.network import address
from tests.support.processes import TansuBroker
from tests.support.proxy import FaultProxy
from tests.support.services import AMQP_URL

BROKERS = ["memory", "rabbitmq", "kafka"]


@pytest.fixture
async def rabbit(rabbitmq: str) -> AsyncIterator[RabbitMQHarness]:
    """RabbitMQ with an exchange and queues of this test's own."""
    harness = RabbitMQHarness()
    yield harness
    await harness.close()


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The broker under test (ids memory / rabbitmq / kafka)."""
    harness: Harness
    if request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq")
        harness = RabbitMQHarness()
    elif request.param == "kafka":
        request.getfixturevalue("kafka")
        harness = KafkaHarness()
    else:
        harness = MemoryHarness()
    yield harness
    await harness.close()


@pytest.fixture
async def publisher(broker: Harness) -> AsyncIterator[Publisher]:
    """A connected publisher to the broker under test."""
    publisher = broker.make_publisher()
    await publisher.connect()
    yield publisher
    await publisher.close()


@pytest.fixture(params=BROKERS)
async def outage(request: pytest.FixtureRequest) -> AsyncIterator[Outage]:
    """The broker under test behind something that can fail: a switch, a proxy, a process."""
    if request.param == "memory":
        memory = MemoryHarness()
        broker: MemoryBroker = memory.broker
        yield Outage(
            memory, called(broker.start_outage), called(broker.end_outage), keeps_messages=True
        )
        await memory.close()
    elif request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq")
        with FaultProxy(*address(AMQP_URL, 5672)) as proxy:
            rabbit = RabbitMQHarness(
                AMQP_URL, publish_url=proxy.url_for(AMQP_URL), connect_timeout=3, confirm_timeout=5
            )
            yield Outage(rabbit, called(proxy.cut), called(proxy.restore), keeps_messages=True)
            proxy.cut()
            await rabbit.close()
    else:
        broker_process = TansuBroker(request.getfixturevalue("tansu"))
        await asyncio.to_thread(broker_process.start)
        kafka = KafkaHarness(
            broker_process.url,
            message_timeout_ms=1500,
            connect_timeout=3,
            config={"reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 250},
        )
        yield Outage(
            kafka,
            called(broker_process.kill),
            in_thread(broker_process.start),
            keeps_messages=False,
        )
        broker_process.kill()
