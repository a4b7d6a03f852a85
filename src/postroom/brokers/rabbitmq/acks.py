"""Acknowledgements of one channel's deliveries: several in one frame where that is safe.

``basic.ack`` with ``multiple`` acknowledges every delivery of the channel up to a tag that
RabbitMQ still counts unacknowledged. postroom settles deliveries out of order (batches side
by side, a message retried alone while a later batch commits), so such a frame is sent only
for a run of settled deliveries at the front of the channel's unacknowledged ones: a message
whose transaction has not committed is never acknowledged by another's frame. Settled
deliveries behind an unsettled one are acknowledged one by one straight away, so a slow
handler never holds back the others' acknowledgements (and with them the prefetch window).

Every frame that acknowledges or rejects a delivery of the channel is sent under one lock,
after the window has been brought up to date, so a multiple ack never names or covers a tag
already acknowledged alone (RabbitMQ answers that by closing the channel). Each delivery is
entered into the window before anything else is done with it, so one that could not even be
read stays unsettled there and no multiple ack passes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class AckWindow:
    """The deliveries of one channel that RabbitMQ counts unacknowledged, in tag order,
    each with whether postroom has settled it (its transaction committed)."""

    def __init__(self) -> None:
        self._unacked: dict[int, list[Any]] = {}
        """Delivery tag → [aio-pika incoming message, settled]; tags arrive in order."""
        self._settled = 0
        """How many of them are settled."""
        self._lock = asyncio.Lock()

    def received(self, incoming: Any) -> None:
        """Enter a delivery as it arrives, unsettled."""
        self._unacked[int(incoming.delivery_tag)] = [incoming, False]

    def holds(self, tag: int) -> bool:
        """True while the delivery ``tag`` is not acknowledged or rejected."""
        return tag in self._unacked

    def settle(self, tag: int) -> None:
        """Count delivery ``tag`` settled; a later :meth:`ack` on this channel sends it."""
        entry = self._unacked.get(tag)
        if entry is not None and not entry[1]:
            entry[1] = True
            self._settled += 1

    async def ack(self, tag: int) -> None:
        """Settle delivery ``tag`` and acknowledge every settled one that may be: the run
        at the front in one frame, those behind an unsettled delivery one by one."""
        self.settle(tag)
        async with self._lock:
            front, behind = self._take_settled()
            if front is not None:
                await front.ack(multiple=True)
            for incoming in behind:
                await incoming.ack()

    async def alone(self, tag: int, send: Callable[[], Awaitable[None]]) -> None:
        """Send ``send`` (the ack or nack of delivery ``tag`` alone) and forget the tag;
        nothing if it is already acknowledged."""
        async with self._lock:
            if tag not in self._unacked:
                return
            try:
                await send()
            finally:
                if self._unacked.pop(tag)[1]:
                    self._settled -= 1

    def _take_settled(self) -> tuple[Any | None, list[Any]]:
        """Remove the settled deliveries: the last of the settled run at the front (for a
        multiple ack), and the settled ones behind the first unsettled one."""
        front = None
        while self._settled:
            tag, (incoming, settled) = next(iter(self._unacked.items()))
            if not settled:
                break
            del self._unacked[tag]
            self._settled -= 1
            front = incoming
        if not self._settled:
            return front, []
        behind = [incoming for incoming, settled in self._unacked.values() if settled]
        for incoming in behind:
            del self._unacked[int(incoming.delivery_tag)]
        self._settled = 0
        return front, behind
