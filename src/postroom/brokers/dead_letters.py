"""A consumer's dead letters as a broker capability: browse a page, find one, requeue.

Each broker module implements :class:`DeadLetters` (RabbitMQ: the queue
``<consumer>.dead-letter``; Kafka: the topic of that name; memory: that topic of a
:class:`~postroom.brokers.memory.MemoryBroker`). Reading never removes a dead letter, and
memory stays bounded by one page: finding one by id scans page by page and keeps only the
match; listings carry no payloads (only their sizes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol, runtime_checkable

from postroom.brokers.base import (
    HEADER_ATTEMPTS,
    HEADER_CONSUMER,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_TOPIC,
)
from postroom.errors import PostroomError
from postroom.message import HEADER_ID, normalize_id

#: Seconds to wait for a broker to answer (connection, metadata, confirms).
BROKER_TIMEOUT: Final = 15.0
#: Kafka: the suffix of the consumer group that remembers what was requeued.
CLI_GROUP_SUFFIX: Final = ".dead-letter-cli"
#: Dead letters read per page while scanning.
PAGE_SIZE: Final = 100
#: Headers a dead-lettered copy carries that its requeued copy must not.
DEAD_LETTER_HEADERS: Final = frozenset(
    {HEADER_ERROR, HEADER_ATTEMPTS, HEADER_CONSUMER, HEADER_DEAD_LETTERED_AT}
)


class DeadLetterError(PostroomError):
    """A dead-letter operation the broker could not do (the sentence says what to do)."""


@dataclass
class DeadLetter:
    """One dead-lettered message as read from the broker (not removed by reading it)."""

    id: str
    """The message id: its ``postroom-id``, else (RabbitMQ) its AMQP ``message_id``; without
    either, a digest of the message (``sha-...``, RabbitMQ) or its position (Kafka)."""
    position: str
    """Where it is: ``#N`` in the queue as read (RabbitMQ, memory), ``PARTITION:OFFSET`` (Kafka)."""
    body: bytes
    """The payload; empty in listings (see :attr:`payload_bytes`)."""
    headers: dict[str, str]
    content_type: str
    key: str | None = None
    partition: int | None = None
    offset: int | None = None
    broker_timestamp: datetime | None = None
    size: int | None = None
    """The payload's size when :attr:`body` was left out."""
    broker_message_id: str | None = None
    """RabbitMQ: the AMQP ``message_id`` property (another producer's may differ from
    :attr:`id`)."""

    @property
    def payload_bytes(self) -> int:
        """The payload's size in bytes (also when it was left out)."""
        return len(self.body) if self.size is None else self.size

    @property
    def topic(self) -> str | None:
        """The topic it was first published to."""
        return self.headers.get(HEADER_TOPIC)

    @property
    def error(self) -> str | None:
        """Why it was dead-lettered."""
        return self.headers.get(HEADER_ERROR)

    @property
    def attempts(self) -> int | None:
        """Handler runs made before it was dead-lettered."""
        try:
            return int(self.headers[HEADER_ATTEMPTS])
        except (KeyError, ValueError):
            return None

    @property
    def dead_lettered_at(self) -> datetime | None:
        """When it was dead-lettered (the header, else the broker's timestamp)."""
        text = self.headers.get(HEADER_DEAD_LETTERED_AT)
        if text:
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(text)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        return self.broker_timestamp

    def is_called(self, name: str) -> bool:
        """True if ``name`` is its id, its ``postroom-id``, its AMQP ``message_id`` (any
        spelling of a UUID: upper case, braces, ``urn:uuid:``) or its position."""
        wanted = name.strip()
        if wanted == self.position:
            return True
        ids = (self.id, self.headers.get(HEADER_ID), self.broker_message_id)
        wanted = normalize_id(wanted)
        return any(normalize_id(known.strip()) == wanted for known in ids if known)

    def without_payload(self) -> DeadLetter:
        """A copy without the payload (its size kept), for listings."""
        return dataclasses.replace(self, body=b"", size=self.payload_bytes)

    def summary(self) -> dict[str, Any]:
        """The facts a listing shows, for ``--json``."""
        return {
            "id": self.id,
            "position": self.position,
            "topic": self.topic,
            "key": self.key,
            "attempts": self.attempts,
            "error": self.error,
            "dead_lettered_at": self.dead_lettered_at,
            "dead_lettered_by": self.headers.get(HEADER_CONSUMER),
            "content_type": self.content_type,
            "payload_bytes": self.payload_bytes,
        }


@dataclass
class Listing:
    """What a look at the dead letters found (payloads left out)."""

    letters: list[DeadLetter]
    total: int
    """All dead letters there (RabbitMQ: ready messages in the queue; Kafka: not requeued)."""
    missing: bool = False
    """The queue or topic does not exist (nothing was ever dead-lettered)."""


@dataclass
class Found:
    """The first dead letter with a given id or position, and how many have it."""

    letter: DeadLetter | None
    copies: int = 0
    missing: bool = False
    """The queue or topic does not exist."""


@dataclass
class Requeued:
    """What a requeue did."""

    requeued: list[DeadLetter] = field(default_factory=list)
    failures: list[tuple[DeadLetter, str]] = field(default_factory=list)
    still_listed: list[DeadLetter] = field(default_factory=list)
    """Kafka: requeued, but still listed because an earlier record was not requeued."""
    holding_back: list[DeadLetter] = field(default_factory=list)
    """Kafka: the records not requeued that keep ``still_listed`` listed."""
    vanished: list[DeadLetter] = field(default_factory=list)
    """Selected, but no longer there when requeued (someone else took them)."""


@runtime_checkable
class DeadLetters(Protocol):
    """One consumer's dead letters on one broker."""

    where: str
    """Where they are, for sentences (never with a password)."""
    target: str
    """Where requeue sends them, for sentences."""
    order_note: str
    """How listing affects the order, for people."""

    async def browse(self, limit: int | None) -> Listing:
        """The first ``limit`` dead letters (all with None) without payloads, left in place."""
        ...

    async def find(self, name: str) -> Found:
        """The first dead letter whose id or position is ``name``, with its payload.

        Scans page by page and keeps only the match: memory does not grow with the queue.
        """
        ...

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        """Send ``selected`` (as listed) back to the consumer, then remove them."""
        ...


def digest(body: bytes, headers: dict[str, str]) -> str:
    """A stable name for a dead letter without a message id."""
    data = hashlib.sha256(body)
    for name in sorted(headers):
        if name not in DEAD_LETTER_HEADERS:
            data.update(f"\0{name}\0{headers[name]}".encode())
    return "sha-" + data.hexdigest()[:16]


def first_match(letters: Iterable[DeadLetter], name: str) -> Found:
    """Scan ``letters`` (a stream), keeping only the first called ``name`` and a count."""
    found = Found(None)
    for letter in letters:
        if letter.is_called(name):
            found.copies += 1
            if found.letter is None:
                found.letter = letter
    return found
