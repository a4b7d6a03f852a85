"""CloudEvents binary content mode: the attributes the relay's publishers add to a message.

One mapping for both brokers, per the CloudEvents 1.0 protocol bindings:

* Kafka: each attribute in a ``ce_<name>`` header; ``datacontenttype`` in ``content-type``.
* RabbitMQ: each attribute in a ``cloudEvents_<name>`` header (the AMQP binding's
  application properties, ``_`` being the separator it prefers) and, for the RabbitMQ
  binding of Knative and the ``cloudevents`` SDK, in a ``ce-<name>`` header;
  ``datacontenttype`` is the message's ``content_type`` property (set for every message).

The attributes: ``id`` (the message id), ``source`` (:attr:`CloudEvents.source`),
``specversion`` ``1.0``, ``type`` (the topic, or the message's own ``ce_type`` header),
``time`` (``created_at``, RFC 3339) and ``datacontenttype`` (the content type).
postroom's own headers stay beside them.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from datetime import UTC
from typing import Final

from postroom.errors import ConfigurationError
from postroom.message import Message

SPEC_VERSION: Final = "1.0"
DEFAULT_SOURCE: Final = "postroom"
#: A user header of this name sets the ``type`` attribute (instead of the topic).
TYPE_HEADER: Final = "ce_type"
#: The header a Kafka record's datacontenttype travels in.
KAFKA_CONTENT_TYPE: Final = "content-type"
_OFF: Final = frozenset({"", "off", "false", "none", "0"})
_PATTERN: Final = re.compile(r"[A-Za-z0-9._*?\[\]-]{1,249}")
_MAX_SOURCE_CHARS: Final = 1000


@dataclass(frozen=True)
class CloudEvents:
    """Which topics are published as CloudEvents, and the ``source`` they carry.

    ``topics`` are topic names or glob patterns (``orders.*``); ``("*",)`` is every topic.
    """

    topics: tuple[str, ...] = ("*",)
    source: str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        check_source(self.source)
        for pattern in self.topics:
            if not _PATTERN.fullmatch(pattern):
                raise ConfigurationError(
                    f"cloudevents topic {pattern!r} is not a topic name or glob pattern "
                    "(letters, digits, '.', '_', '-', '*', '?', '[]'); set POSTROOM_CLOUDEVENTS "
                    "to off, all, or a comma-separated list such as orders.*,payments"
                )

    @classmethod
    def parse(cls, text: str, source: str = DEFAULT_SOURCE) -> CloudEvents | None:
        """The ``cloudevents`` setting: ``off`` (None), ``all``, or a comma-separated list
        of topics and glob patterns. Raises ConfigurationError for anything else."""
        value = text.strip()
        if value.lower() in _OFF:
            return None
        if value.lower() in {"all", "on", "true", "*"}:
            return cls(("*",), source)
        topics = tuple(part.strip() for part in value.split(","))
        if any(not part for part in topics):
            raise ConfigurationError(
                f"cloudevents {text!r} has an empty topic; set POSTROOM_CLOUDEVENTS to off, "
                "all, or a comma-separated list such as orders.*,payments"
            )
        return cls(topics, source)

    def applies_to(self, topic: str) -> bool:
        """True if messages of ``topic`` are published as CloudEvents."""
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.topics)

    def attributes(self, message: Message) -> dict[str, str]:
        """The CloudEvents attributes of ``message`` but ``datacontenttype``, as text."""
        created = message.created_at
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        time = created.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return {
            "specversion": SPEC_VERSION,
            "id": str(message.id),
            "source": self.source,
            "type": message.headers.get(TYPE_HEADER) or message.topic,
            "time": time,
        }

    def kafka_headers(self, message: Message) -> dict[str, str]:
        """The Kafka headers of ``message`` in binary mode (none for a topic not covered)."""
        if not self.applies_to(message.topic):
            return {}
        headers = {f"ce_{name}": value for name, value in self.attributes(message).items()}
        headers[KAFKA_CONTENT_TYPE] = message.content_type
        return headers

    def amqp_headers(self, message: Message) -> dict[str, str]:
        """The AMQP 0-9-1 headers of ``message`` in binary mode (none for a topic not
        covered); ``datacontenttype`` is the ``content_type`` property, set anyway."""
        if not self.applies_to(message.topic):
            return {}
        attributes = self.attributes(message)
        headers = {f"cloudEvents_{name}": value for name, value in attributes.items()}
        headers.update({f"ce-{name}": value for name, value in attributes.items()})
        return headers


def check_source(source: object) -> None:
    """Raise ConfigurationError unless ``source`` is a usable CloudEvents ``source``."""
    if (
        not isinstance(source, str)
        or not source.strip()
        or len(source) > _MAX_SOURCE_CHARS
        or not source.isprintable()
    ):
        raise ConfigurationError(
            f"cloudevents_source {source!r} is not a usable CloudEvents source; give a "
            "non-empty URI reference such as /shop/orders or https://shop.example/orders "
            "(set POSTROOM_CLOUDEVENTS_SOURCE)"
        )
