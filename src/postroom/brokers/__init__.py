"""Brokers: the Publisher protocol and one implementation per broker (memory, RabbitMQ, Kafka).

:func:`publisher_from_url` picks the implementation from a URL's scheme. The RabbitMQ and
Kafka modules import their client library, so they are only imported when asked for.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import unquote, urlsplit

from postroom.brokers.base import CONFIRMED, Outcome, Publisher, PublishResult
from postroom.errors import ConfigurationError

__all__ = [
    "CONFIRMED",
    "URL_FORMS",
    "Outcome",
    "PublishResult",
    "Publisher",
    "publisher_from_url",
]

#: The broker URL forms publisher_from_url() accepts, for error messages and help texts.
URL_FORMS: Final = (
    "amqp://user:password@host:5672/vhost, amqps://user:password@host:5671/vhost, "
    "kafka://host:9092[,host2:9092][?librdkafka.setting=value] or memory://[name]"
)


def publisher_from_url(url: str, **options: Any) -> Publisher:
    """A Publisher for ``url``, chosen by its scheme; ``options`` go to its constructor.

    ``amqp``/``amqps`` give a :class:`~postroom.brokers.rabbitmq.RabbitMQPublisher`,
    ``kafka`` a :class:`~postroom.brokers.kafka.KafkaPublisher`, and ``memory://name`` a
    publisher into the process-wide :class:`~postroom.brokers.memory.MemoryBroker` of
    that name (``memory://`` alone: the one named ``default``).
    """
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in {"amqp", "amqps"}:
        from postroom.brokers.rabbitmq import RabbitMQPublisher

        return RabbitMQPublisher(url, **options)
    if scheme == "kafka":
        from postroom.brokers.kafka import KafkaPublisher

        return KafkaPublisher.from_url(url, **options)
    if scheme == "memory":
        from postroom.brokers.memory import MemoryBroker

        if options:
            raise ConfigurationError(
                f"memory:// publishers take no options, got {', '.join(sorted(options))}"
            )
        parts = urlsplit(url)
        name = unquote(parts.netloc + parts.path.rstrip("/")) or "default"
        return MemoryBroker.named(name).publisher()
    # The URL itself is not shown: without a recognised scheme, a password in it
    # cannot be found reliably to be hidden.
    what = f"has the scheme {scheme!r}" if scheme else "has no scheme"
    raise ConfigurationError(
        f"the broker URL {what}, which postroom cannot publish to; use {URL_FORMS}"
    )
