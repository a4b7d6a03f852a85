"""The services the suites run against: their URLs, and checks that they answer.

``DATABASE_URL`` comes from ``POSTROOM_DATABASE_URL`` (postroom itself has no default
database; the suites fall back to the local ``test`` database the Makefile names too);
``AMQP_URL`` and ``KAFKA_URL`` come from ``POSTROOM_TEST_AMQP_URL`` and
``POSTROOM_TEST_KAFKA_URL``. :func:`rabbitmq_available` and :func:`kafka_available` check
that a broker answers, retrying with backoff for up to ``POSTROOM_TEST_PROBE_SECONDS``
(20 s by default) before deciding, so one slow answer decides nothing. Only a positive
answer is remembered; a negative one is probed again by the next test (one short try,
so a missing service costs every later test a second, not the whole budget).

A missing service fails the test, with one message naming the service, its URL (password
hidden) and `make services`, unless the run asks to skip it:
``POSTROOM_TEST_SKIP_MISSING=rabbitmq,kafka`` (names: postgresql, rabbitmq, kafka, tansu,
...; ``all`` for every one) turns that failure into a skip (:func:`require_service`). The
fixtures are in :mod:`tests.support.fixtures`.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from postroom.urls import redact_url
from tests.support.network import address

DATABASE_URL = (
    os.environ.get("POSTROOM_DATABASE_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("POSTROOM_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
KAFKA_URL = os.environ.get("POSTROOM_TEST_KAFKA_URL") or "kafka://127.0.0.1:9092"
_KAFKA_HOST, _KAFKA_PORT = address(KAFKA_URL, 9092)
KAFKA_BOOTSTRAP = f"{_KAFKA_HOST}:{_KAFKA_PORT}"
"""``host:port`` of ``KAFKA_URL``, for plain confluent-kafka clients."""

SKIP_VARIABLE = "POSTROOM_TEST_SKIP_MISSING"
"""The variable that turns a missing service from a failure into a skip."""
PROBE_VARIABLE = "POSTROOM_TEST_PROBE_SECONDS"
"""The variable that sets how long a probe retries before it decides (default 20 s)."""
#: Once a service was found missing, a later probe tries once for this long.
SECOND_LOOK_SECONDS = 1.0

_answered: set[str] = set()
_missing: set[str] = set()


class ServiceMissing(Exception):
    """One probe attempt found no service (or not the one expected)."""


def probe_seconds() -> float:
    """How long a probe retries before it decides (``POSTROOM_TEST_PROBE_SECONDS``)."""
    return float(os.environ.get(PROBE_VARIABLE) or 20.0)


def skip_requested(name: str) -> bool:
    """Whether ``POSTROOM_TEST_SKIP_MISSING`` names this service (or says ``all``)."""
    asked = {part.strip().lower() for part in os.environ.get(SKIP_VARIABLE, "").split(",")}
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    return "all" in asked or bool(asked & words)


def require_service(name: str, reason: str, *, url: str | None = None) -> None:
    """Fail the test because ``name`` is missing, or skip it when the run asked to."""
    where = f" at {redact_url(url)}" if url else ""
    message = (
        f"{name} is not available{where}: {reason}. Start it with `make services`, "
        f"or set {SKIP_VARIABLE}={name.split()[-1].lower()} (or =all) to skip what needs it"
    )
    if skip_requested(name):
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def probe(name: str, url: str, attempt: Callable[[float], None], *, within: float | None) -> None:
    """Call ``attempt(timeout)`` until it succeeds, with backoff, for up to ``within``
    seconds (default :func:`probe_seconds`); then :func:`require_service` decides."""
    key = f"{name}|{url}"
    if key in _answered:
        return
    if within is None:
        within = SECOND_LOOK_SECONDS if key in _missing else probe_seconds()
    started = time.monotonic()
    deadline = started + within
    delay = 0.1
    tries = 0
    while True:
        tries += 1
        try:
            attempt(max(0.2, min(5.0, deadline - time.monotonic())))
        except (OSError, ServiceMissing) as exc:
            last = f"{exc}".strip() or type(exc).__name__
        else:
            _answered.add(key)
            _missing.discard(key)
            return
        if time.monotonic() + delay >= deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    _missing.add(key)
    waited = time.monotonic() - started
    require_service(name, f"{last} ({tries} tries in {waited:.1f} s)", url=url)


class QuietLog:
    """A librdkafka logger that drops everything (outages and probes make it noisy)."""

    def log(self, *args: Any) -> None:
        return None


def rabbitmq_available(url: str = AMQP_URL, *, within: float | None = None) -> str:
    """``url`` once something at it speaks AMQP 0-9-1 (else fails, or skips when asked)."""
    host, port = address(url, 5672)

    def attempt(timeout: float) -> None:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            if sock.recv(1) != b"\x01":
                raise ServiceMissing(f"{host}:{port} does not speak AMQP 0-9-1")

    probe("RabbitMQ", url, attempt, within=within)
    return url


def kafka_available(bootstrap: str = KAFKA_BOOTSTRAP, *, within: float | None = None) -> str:
    """``bootstrap`` once Kafka answers there (else fails, or skips when asked)."""

    def attempt(timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": QuietLog()}
        try:
            AdminClient(config).list_topics(timeout=timeout)
        except Exception as exc:
            raise ServiceMissing(f"nothing answers at {bootstrap} ({exc})") from exc

    probe("Kafka", f"kafka://{bootstrap}", attempt, within=within)
    return bootstrap
