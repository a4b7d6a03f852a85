"""Fixtures of the contract suite: every test runs against memory, RabbitMQ and Kafka."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from postroom.brokers import Publisher
from postroom.brokers.memory import MemoryBroker
from tests.conftest import require_service
from tests.contract.harness import (
    AMQP_URL,
    KAFKA_URL,
    Harness,
    KafkaHarness,
    MemoryHarness,
    Outage,
    PrivateTansu,
    RabbitMQHarness,
    TcpProxy,
    amqp_address,
    amqp_address_replaced,
)

BROKERS = ["memory", "rabbitmq", "kafka"]


@pytest.fixture(scope="session")
def rabbitmq_available() -> None:
    """Fail (CI) or skip unless an AMQP broker answers at POSTROOM_TEST_AMQP_URL."""
    host, port = amqp_address(AMQP_URL)
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            answer = sock.recv(1)
    except OSError as exc:
        require_service("RabbitMQ", f"nothing answers at {host}:{port} ({exc})")
    else:
        if answer != b"\x01":
            require_service("RabbitMQ", f"{host}:{port} does not speak AMQP 0-9-1")


@pytest.fixture(scope="session")
def kafka_available() -> None:
    """Fail (CI) or skip unless Kafka answers at POSTROOM_TEST_KAFKA_URL."""
    from confluent_kafka.admin import AdminClient

    from postroom.brokers.kafka import parse_kafka_url

    bootstrap, _ = parse_kafka_url(KAFKA_URL)
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _Quiet()})
    try:
        admin.list_topics(timeout=5)
    except Exception as exc:
        require_service("Kafka", f"nothing answers at {bootstrap} ({exc})")


class _Quiet:
    """A librdkafka logger that drops everything (availability probes fail noisily)."""

    def log(self, *args: Any) -> None:
        return None


@pytest.fixture
async def rabbit(rabbitmq_available: None) -> AsyncIterator[RabbitMQHarness]:
    """RabbitMQ with an exchange and queues of this test's own."""
    harness = RabbitMQHarness()
    yield harness
    await harness.close()


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The broker under test (ids memory / rabbitmq / kafka)."""
    harness: Harness
    if request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq_available")
        harness = RabbitMQHarness()
    elif request.param == "kafka":
        request.getfixturevalue("kafka_available")
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

        async def start_outage() -> None:
            broker.start_outage()

        async def end_outage() -> None:
            broker.end_outage()

        yield Outage(memory, start_outage, end_outage, keeps_messages=True)
        await memory.close()
    elif request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq_available")
        host, port = amqp_address(AMQP_URL)
        proxy = TcpProxy(host, port)
        await proxy.start()
        through_proxy = amqp_address_replaced(AMQP_URL, "127.0.0.1", proxy.port)
        rabbit = RabbitMQHarness(
            AMQP_URL, publish_url=through_proxy, connect_timeout=3, confirm_timeout=5
        )
        yield Outage(rabbit, proxy.cut, proxy.start, keeps_messages=True)
        await proxy.cut()
        await rabbit.close()
    else:
        broker_process = PrivateTansu(request.getfixturevalue("tansu"))
        await broker_process.start()
        kafka = KafkaHarness(
            broker_process.url,
            message_timeout_ms=1500,
            connect_timeout=3,
            config={"reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 250},
        )
        yield Outage(kafka, broker_process.stop, broker_process.start, keeps_messages=False)
        await broker_process.stop()
