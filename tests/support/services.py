"""The services the suites run against: their URLs, and checks that they answer.

``DATABASE_URL`` comes from ``POSTROOM_DATABASE_URL`` (postroom itself has no default
database; the suites fall back to the local ``test`` database the Makefile names too);
``AMQP_URL`` and ``KAFKA_URL`` come from ``POSTROOM_TEST_AMQP_URL`` and
``POSTROOM_TEST_KAFKA_URL``. :func:`rabbitmq_available` and :func:`kafka_available` check
that a broker answers; a missing service fails the run under CI and skips the test elsewhere
(:func:`require_service`). Their fixtures are in :mod:`tests.support.fixtures`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from tests.support.network import address

DATABASE_URL = (
    os.environ.get("POSTROOM_DATABASE_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("POSTROOM_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_URL = os.environ.get("POSTROOM_TEST_KAFKA_URL") or "kafka://127.0.0.1:9092"
_KAFKA_HOST, _KAFKA_PORT = address(KAFKA_URL, 9092)
KAFKA_BOOTSTRAP = f"{_KAFKA_HOST}:{_KAFKA_PORT}"
"""``host:port`` of ``KAFKA_URL``, for plain confluent-kafka clients."""


def require_service(name: str, reason: str) -> None:
    """Fail (under CI) or skip (on a developer machine) when a service is missing."""
    message = f"{name} is not available: {reason}; run `make services`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class QuietLog:
    """A librdkafka logger that drops everything (outages and probes make it noisy)."""

    def log(self, *args: Any) -> None:
        return None


def rabbitmq_available() -> str:
    """The AMQP URL, once something at it speaks AMQP 0-9-1 (fails under CI, skips elsewhere)."""
    host, port = address(AMQP_URL, 5672)
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            if sock.recv(1) != b"\x01":
                require_service("RabbitMQ", f"{host}:{port} does not speak AMQP 0-9-1")
    except OSError as exc:
        require_service("RabbitMQ", f"nothing answers at {host}:{port} ({exc})")
    return AMQP_URL


def kafka_available() -> str:
    """The Kafka bootstrap address, once Kafka answers there (fails under CI, skips elsewhere)."""
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {"bootstrap.servers": KAFKA_BOOTSTRAP, "logger": QuietLog()}
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=5)
    except Exception as exc:
        require_service("Kafka", f"nothing answers at {KAFKA_BOOTSTRAP} ({exc})")
    return KAFKA_BOOTSTRAP
