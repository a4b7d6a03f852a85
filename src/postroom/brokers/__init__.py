"""Brokers: the Publisher, Subscriber and DeadLetters protocols and one implementation of
each per broker (memory, RabbitMQ, Kafka).

:func:`publisher_from_url`, :func:`subscriber_from_url` and :func:`dead_letters_from_url`
pick the implementation from a URL's scheme. The RabbitMQ and
Kafka modules import their client library, so they are only imported when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from postroom.brokers.base import (
    CONFIRMED,
    Delivery,
    Outcome,
    Publisher,
    PublishResult,
    Subscriber,
)
from postroom.brokers.dead_letters import DeadLetter, DeadLetters, Found, Listing, Requeued
from postroom.errors import ConfigurationError
from postroom.urls import BROKER_URL_FORMS

if TYPE_CHECKING:
    from postroom.brokers.memory import MemoryBroker

__all__ = [
    "CONFIRMED",
    "URL_FORMS",
    "DeadLetter",
    "DeadLetters",
    "Delivery",
    "Found",
    "Listing",
    "Outcome",
    "PublishResult",
    "Publisher",
    "Requeued",
    "Subscriber",
    "dead_letters_from_url",
    "publisher_from_url",
    "subscriber_from_url",
]

#: The broker URL forms publisher_from_url() accepts, for error messages and help texts.
URL_FORMS: Final = BROKER_URL_FORMS


def publisher_from_url(url: str, **options: Any) -> Publisher:
    """A Publisher for ``url``, chosen by its scheme; ``options`` go to its constructor.

    ``amqp``/``amqps`` give a :class:`~postroom.brokers.rabbitmq.RabbitMQPublisher`,
    ``kafka`` a :class:`~postroom.brokers.kafka.KafkaPublisher`, and ``memory://name`` a
    publisher into the process-wide :class:`~postroom.brokers.memory.MemoryBroker` of
    that name (``memory://`` alone: the one named ``default``).
    """
    scheme = _scheme(url)
    if scheme in {"amqp", "amqps"}:
        from postroom.brokers.rabbitmq import RabbitMQPublisher

        return RabbitMQPublisher(url, **options)
    if scheme == "kafka":
        from postroom.brokers.kafka import KafkaPublisher

        return KafkaPublisher.from_url(url, **options)
    if scheme == "memory":
        if options:
            raise ConfigurationError(
                f"memory:// publishers take no options, got {', '.join(sorted(options))}"
            )
        return _memory_broker(url).publisher()
    raise _unsupported(scheme, "publish to")


def subscriber_from_url(url: str, *, prefetch: int) -> Subscriber:
    """A Subscriber for ``url`` (same schemes as :func:`publisher_from_url`)."""
    scheme = _scheme(url)
    if scheme in {"amqp", "amqps"}:
        from postroom.brokers.rabbitmq import RabbitMQSubscriber

        return RabbitMQSubscriber(url, prefetch=prefetch)
    if scheme == "kafka":
        from postroom.brokers.kafka import KafkaSubscriber

        return KafkaSubscriber.from_url(url, prefetch=prefetch)
    if scheme == "memory":
        from postroom.brokers.memory import MemorySubscriber

        return MemorySubscriber(_memory_broker(url))
    raise _unsupported(scheme, "consume from")


def dead_letters_from_url(url: str, consumer: str) -> DeadLetters:
    """The dead letters of ``consumer`` at ``url`` (same schemes as :func:`publisher_from_url`)."""
    scheme = _scheme(url)
    if scheme in {"amqp", "amqps"}:
        from postroom.brokers.rabbitmq import RabbitMQDeadLetters

        return RabbitMQDeadLetters(url, consumer)
    if scheme == "kafka":
        from postroom.brokers.kafka import KafkaDeadLetters

        return KafkaDeadLetters(url, consumer)
    if scheme == "memory":
        from postroom.brokers.memory import MemoryDeadLetters

        return MemoryDeadLetters(_memory_broker(url), consumer)
    raise _unsupported(scheme, "read dead letters from")


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def _memory_broker(url: str) -> MemoryBroker:
    from postroom.brokers.memory import MemoryBroker

    parts = urlsplit(url)
    return MemoryBroker.named(unquote(parts.netloc + parts.path.rstrip("/")) or "default")


def _unsupported(scheme: str, verb: str) -> ConfigurationError:
    # The URL itself is not shown: without a recognised scheme, a password in it
    # cannot be found reliably to be hidden.
    what = f"has the scheme {scheme!r}" if scheme else "has no scheme"
    return ConfigurationError(
        f"the broker URL {what}, which postroom cannot {verb}; use {URL_FORMS}"
    )
