"""RabbitMQ: a confirming publisher, a queue-per-consumer subscriber and dead letters.

aio-pika is imported only here and in this package's modules; without the ``rabbitmq``
extra, importing it raises MissingExtraError with the install command.
"""

from __future__ import annotations

from postroom.errors import MissingExtraError

try:
    import aio_pika  # noqa: F401  (checked here, used by the modules below)
    import aiormq  # noqa: F401
    from pamqp.commands import Basic  # noqa: F401
except ImportError:
    raise MissingExtraError("aio-pika", "rabbitmq") from None

from postroom.brokers.rabbitmq.dead_letters import RabbitMQDeadLetters
from postroom.brokers.rabbitmq.publisher import (
    DEFAULT_CONFIRM_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EXCHANGE,
    DEFAULT_MAX_MESSAGE_BYTES,
    EXCHANGE_PATTERN,
    RabbitMQPublisher,
)
from postroom.brokers.rabbitmq.publisher import _broker_size_limit as _broker_size_limit
from postroom.brokers.rabbitmq.subscriber import RabbitMQDelivery, RabbitMQSubscriber
from postroom.brokers.rabbitmq.topology import retry_queue_name, retry_tier_ms

__all__ = [
    "DEFAULT_CONFIRM_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_EXCHANGE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "EXCHANGE_PATTERN",
    "RabbitMQDeadLetters",
    "RabbitMQDelivery",
    "RabbitMQPublisher",
    "RabbitMQSubscriber",
    "retry_queue_name",
    "retry_tier_ms",
]
