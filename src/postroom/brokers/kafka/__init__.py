"""Kafka: an idempotent publisher (``acks=all``), a consumer-group subscriber and dead letters.

confluent-kafka is imported only here and in this package's modules; without the ``kafka``
extra, importing it raises MissingExtraError with the install command.
"""

from __future__ import annotations

from postroom.errors import MissingExtraError

try:
    import confluent_kafka  # noqa: F401  (checked here, used by the modules below)
except ImportError:
    raise MissingExtraError("confluent-kafka", "kafka") from None

from postroom.brokers.kafka.dead_letters import KafkaDeadLetters
from postroom.brokers.kafka.producer import KafkaPublisher
from postroom.brokers.kafka.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MESSAGE_TIMEOUT_MS,
    DEFAULT_PORT,
    DELIVERY_GRACE,
    classify_error,
    parse_kafka_url,
)
from postroom.brokers.kafka.subscriber import KafkaDelivery, KafkaSubscriber

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MESSAGE_TIMEOUT_MS",
    "DEFAULT_PORT",
    "DELIVERY_GRACE",
    "KafkaDeadLetters",
    "KafkaDelivery",
    "KafkaPublisher",
    "KafkaSubscriber",
    "classify_error",
    "parse_kafka_url",
]
