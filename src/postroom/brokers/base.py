"""The two small Protocols the relay and the consumer depend on, and their result types."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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

    @property
    def confirmed(self) -> bool:
        """True when the broker confirmed the message."""
        return self.outcome is Outcome.CONFIRMED


CONFIRMED = PublishResult(Outcome.CONFIRMED)


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
