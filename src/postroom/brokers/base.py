"""The two small Protocols the relay and the consumer depend on, and their result types."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from postroom.message import Message


class Outcome(enum.Enum):
    """What became of one message handed to a publisher."""

    CONFIRMED = "confirmed"
    """The broker confirmed it (RabbitMQ publisher confirm, Kafka delivery report)."""
    REJECTED = "rejected"
    """The broker or client refused this message (unroutable, too large, invalid):
    trying it again as it is will likely fail the same way, so it costs an attempt."""
    UNAVAILABLE = "unavailable"
    """Not confirmed because the broker could not be reached or the connection failed:
    the message is not at fault and is tried again without costing an attempt."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The outcome for one message of a batch, with the reason when it was not confirmed."""

    outcome: Outcome
    error: str | None = None
    permanent: bool = False
    """For REJECTED: the message can never be accepted as it is (for example it is larger
    than the broker allows), so the relay dead-letters it at once instead of retrying."""

    @property
    def confirmed(self) -> bool:
        """True when the broker confirmed the message."""
        return self.outcome is Outcome.CONFIRMED


CONFIRMED = PublishResult(Outcome.CONFIRMED)

#: States of a SetupStep.
CREATED: Final = "created"
EXISTS: Final = "exists"
WOULD_CREATE: Final = "would create"
BOUND: Final = "bound"
"""A RabbitMQ binding declared on a queue that existed: AMQP cannot tell whether it did."""
WOULD_BIND: Final = "would bind"
"""A RabbitMQ binding on a queue that exists, in a dry run: bound unless it is already."""


@dataclass(frozen=True)
class SetupStep:
    """One object on the broker and what became of it (or would, in a dry run)."""

    what: str
    """The object: ``queue billing``, ``binding postroom -> billing (orders.created)``,
    ``topic orders.created``."""
    state: str
    """CREATED, EXISTS, WOULD_CREATE, BOUND or WOULD_BIND."""
    warning: str | None = None
    """A difference from what was asked that set-up leaves as it is, with what to do."""


def wire_size(message: Message, extra_headers: Mapping[str, str] | None = None) -> int:
    """Bytes a message takes on the wire before the broker's own framing: body, key and
    every header name and value (postroom's, the user's and ``extra_headers``, such as
    the CloudEvents attributes), UTF-8 encoded."""
    size = len(message.body)
    if message.key is not None:
        size += len(message.key.encode("utf-8", "surrogatepass"))
    headers = message.wire_headers()
    headers.update(extra_headers or {})
    for name, value in headers.items():
        size += len(name.encode("utf-8", "surrogatepass"))
        size += len(value.encode("utf-8", "surrogatepass"))
    return size


def too_large(size: int, limit: int, setting: str) -> PublishResult:
    """A permanent rejection of a message of ``size`` bytes that can never fit ``limit``."""
    return PublishResult(
        Outcome.REJECTED,
        f"too large for the broker: {size} bytes > limit {limit}; raise {setting} or shrink "
        "the message (send a reference to the data instead)",
        permanent=True,
    )


@runtime_checkable
class Publisher(Protocol):
    """Sends batches of messages to a broker and reports, per message, what the broker said.

    ``publish`` sends the whole batch pipelined (without waiting for each confirm before
    sending the next), in the order given, and returns one result per message in that
    order. It never reports CONFIRMED for a message the broker did not confirm: a timeout,
    a return of an unroutable message or a lost connection is REJECTED or UNAVAILABLE.
    It does not raise for per-message or connection failures; it reports them.
    """

    async def connect(self) -> None:
        """Open the connection; raise BrokerUnavailableError (with the reason) if it fails."""
        ...

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        """Publish ``batch`` and return one result per message, in the same order."""
        ...

    async def close(self) -> None:
        """Flush what is in flight (bounded) and close the connection."""
        ...


@runtime_checkable
class Delivery(Protocol):
    """One message received from a broker, to be acknowledged once its handler committed.

    ``lane`` names what must be handled in order: deliveries with the same lane are handed
    out in broker order and handled one after another (a Kafka partition); ``None`` means
    no order is promised (a RabbitMQ queue). ``epoch`` names the lane's assignment the
    delivery came with (Kafka: it changes when the partition is assigned, revoked or
    rewound); ``None`` for brokers without assignments. ``attempt`` is the number of this
    attempt, 1 for the first. A delivery that is ``redeliverable`` can be handed back to the
    broker to come again after a delay (:meth:`retry_later`); others are retried in place.
    ``redelivered`` is True when a previous holder of this very delivery may have been
    handling it when it ended (a consumer process that died, or a release): RabbitMQ's
    ``redelivered`` flag; Kafka: the first record of a partition after each assignment;
    memory: handed out before and not settled. The consumer counts those in the database,
    so a message that kills the process is dead-lettered instead of looping forever.
    """

    topic: str
    body: bytes
    headers: dict[str, str]
    key: str | None
    broker_message_id: str | None
    content_type: str | None
    attempt: int
    lane: object
    epoch: int | None
    redeliverable: bool
    redelivered: bool

    @property
    def revoked(self) -> bool:
        """True once this consumer lost the lane it came from (Kafka: partition revoked or
        reassigned, or rewound past it); always False for brokers without lanes."""
        ...

    async def ack(self) -> None:
        """Acknowledge (RabbitMQ ack, Kafka offset commit); call only after the commit."""
        ...

    async def release(self) -> bool:
        """Hand it back unsettled, to be delivered again as the same attempt (RabbitMQ:
        nack with requeue; Kafka: seek its partition back to it). False if that failed:
        then nothing after it in its lane may be acknowledged."""
        ...

    async def retry_later(self, delay: float, error: str) -> None:
        """Have the broker deliver it again after ``delay`` seconds, as attempt + 1."""
        ...

    async def dead_letter(self, error: str, attempts: int) -> None:
        """Put it on the dead-letter queue/topic with ``error`` and ``attempts``, then ack."""
        ...


@runtime_checkable
class AcknowledgedByLater(Protocol):
    """A delivery acknowledged cumulatively (a Kafka offset commit covers every earlier
    record of its partition; a RabbitMQ multiple ack the settled run of its channel): of
    several of a lane acknowledged together, all but the last can be settled here without
    a message to the broker."""

    def settle_for_later_ack(self) -> None:
        """Count it settled; the ack of a later delivery of its lane tells the broker."""
        ...


@runtime_checkable
class Subscriber(Protocol):
    """Receives the messages of some topics for one consumer, as :class:`Delivery` objects."""

    async def start(self, consumer: str, topics: Sequence[str]) -> None:
        """Connect and subscribe ``consumer`` (its name) to ``topics``; raise if unreachable."""
        ...

    def deliveries(self) -> AsyncIterator[Delivery]:
        """The received deliveries, until :meth:`close` is called."""
        ...

    async def close(self) -> None:
        """Stop receiving; unacknowledged deliveries are redelivered later by the broker."""
        ...


#: Messages waiting for a consumer, by (topic or queue, partition): see :class:`ReportsLag`.
Lag = dict[tuple[str, int | None], int]


@runtime_checkable
class ReportsLag(Protocol):
    """A subscriber that can tell how many messages wait for its consumer (every broker
    postroom ships: Kafka, RabbitMQ, memory). The consumer samples it every few seconds
    into ``postroom_consumer_lag_messages``."""

    async def lag(self) -> Lag:
        """Messages not yet handled, by (topic or queue, partition).

        Kafka: per assigned partition, its high watermark minus the offset of the first
        record not yet acknowledged (or the fetch position before any came). RabbitMQ: the
        ready messages of the consumer's queue, ``(queue, None)`` (messages already handed
        to a consumer count once they are requeued). Memory: the messages of the
        subscribed topics not yet handed out, ``(consumer, None)``. Empty before
        :meth:`Subscriber.start` and after :meth:`Subscriber.close`; raises when the
        broker cannot tell now (the caller keeps the last numbers).
        """
        ...


#: Headers postroom adds to messages it retries or dead-letters.
HEADER_ATTEMPTS = "postroom-attempts"
"""Attempts made so far (failed handler runs), carried on retried and dead-lettered copies."""
HEADER_TOPIC = "postroom-topic"
"""The original topic, on copies that travel through retry and dead-letter queues."""
HEADER_ERROR = "postroom-error"
"""Why a message was dead-lettered."""
HEADER_CONSUMER = "postroom-consumer"
"""The consumer that dead-lettered a message."""
HEADER_DEAD_LETTERED_AT = "postroom-dead-lettered-at"
"""When a message was dead-lettered (ISO 8601, UTC)."""
HEADER_FOR_CONSUMER = "postroom-for-consumer"
#: Where a Kafka dead letter came from (its original partition and offset).
HEADER_PARTITION = "postroom-partition"
HEADER_OFFSET = "postroom-offset"
"""On a copy requeued to a shared topic (``postroom dead-letter requeue`` on Kafka): the one
consumer meant to handle it. Other consumers acknowledge it without handling it."""

#: Longest error text put in a header (brokers limit header sizes).
MAX_ERROR_HEADER_CHARS = 2000


def dead_letter_name(consumer: str) -> str:
    """The dead-letter queue (RabbitMQ) or topic (Kafka) of a consumer: ``<name>.dead-letter``."""
    return f"{consumer}.dead-letter"


def dead_letter_headers(
    delivery: Delivery, consumer: str, error: str, attempts: int
) -> dict[str, str]:
    """The headers of a dead-lettered copy: the original ones plus the reason and attempts."""
    from datetime import UTC, datetime

    headers = dict(delivery.headers)
    headers[HEADER_TOPIC] = delivery.topic
    headers[HEADER_ERROR] = error[:MAX_ERROR_HEADER_CHARS]
    headers[HEADER_ATTEMPTS] = str(attempts)
    headers[HEADER_CONSUMER] = consumer
    headers[HEADER_DEAD_LETTERED_AT] = datetime.now(UTC).isoformat()
    return headers


def attempts_made(headers: dict[str, str]) -> int:
    """Attempts recorded in a delivery's headers (0 for a first delivery)."""
    try:
        return max(0, int(headers.get(HEADER_ATTEMPTS, "0")))
    except ValueError:
        return 0
