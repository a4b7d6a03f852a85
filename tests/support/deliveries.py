"""A delivery made by hand, for the consumer's parts tested without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeDelivery:
    """A broker delivery with the given fields; how it was settled is kept in ``settled``."""

    topic: str = "orders"
    body: bytes = b'{"a":1}'
    headers: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    broker_message_id: str | None = None
    content_type: str | None = None
    attempt: int = 1
    lane: object = None
    redeliverable: bool = True
    redelivered: bool = False
    epoch: int | None = None
    revoked: bool = False
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def release(self) -> bool:
        self.settled.append("release")
        return True

    async def retry_later(self, delay: float, error: str) -> None:
        self.settled.append("retry")

    async def dead_letter(self, error: str, attempts: int) -> None:
        self.settled.append("dead_letter")
