"""An in-process broker for users' tests: a real Publisher, Subscriber and DeadLetters, with
switches for failures."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import ClassVar, Final

from postroom.brokers.base import (
    CONFIRMED,
    HEADER_TOPIC,
    Outcome,
    PublishResult,
    too_large,
    wire_size,
)
from postroom.brokers.dead_letters import DeadLetter, Found, Listing, Requeued, first_match
from postroom.errors import BrokerUnavailableError
from postroom.message import ENVELOPE_HEADERS, Message

#: The error text of results during a simulated outage, unless another reason is given.
DEFAULT_OUTAGE_REASON: Final = "the in-memory broker is down (simulated outage)"


@dataclasses.dataclass
class _Failure:
    outcome: Outcome
    error: str
    remaining: int | None


class MemoryBroker:
    """Holds published messages per topic, in publish order, and can be told to fail.

    It behaves like a broker with publisher confirms: a message is CONFIRMED once stored;
    a topic made unroutable is REJECTED (like RabbitMQ's ``mandatory`` return); during an
    outage every publish is UNAVAILABLE and ``connect()`` raises; specific message ids can
    be made to fail. Stored messages are copies: nothing a caller holds can change them.
    """

    _named: ClassVar[dict[str, MemoryBroker]] = {}
    _named_lock: ClassVar = threading.Lock()

    def __init__(
        self, *, unroutable: Iterable[str] = (), max_message_bytes: int | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._messages: list[Message] = []
        self._requeued: set[int] = set()
        self._settled: dict[str, set[int]] = {}
        self._handed: dict[str, set[int]] = {}
        self._unroutable: set[str] = set(unroutable)
        self._failures: dict[uuid.UUID, _Failure] = {}
        self._outage: str | None = None
        self.max_message_bytes = max_message_bytes
        """Messages larger than this (body, key and headers) are REJECTED permanently
        (None: no limit)."""

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The process-wide broker called ``name`` (what ``memory://name`` URLs publish to)."""
        with cls._named_lock:
            broker = cls._named.get(name)
            if broker is None:
                broker = cls._named[name] = cls()
            return broker

    @classmethod
    def forget(cls, name: str) -> None:
        """Drop the process-wide broker called ``name``; the next ``named(name)`` is empty."""
        with cls._named_lock:
            cls._named.pop(name, None)

    def publisher(self) -> MemoryPublisher:
        """A Publisher that publishes into this broker."""
        return MemoryPublisher(self)

    def messages(self, topic: str | None = None) -> list[Message]:
        """Copies of the confirmed messages (of one topic, or all), in publish order."""
        with self._lock:
            return [_copy(m) for m in self._messages if topic is None or m.topic == topic]

    def topics(self) -> list[str]:
        """The topics that hold messages, in order of their first message."""
        with self._lock:
            return list(dict.fromkeys(m.topic for m in self._messages))

    def clear(self) -> None:
        """Forget every stored message (routing rules, failures and outages stay)."""
        with self._lock:
            self._messages.clear()
            self._requeued.clear()
            self._settled.clear()
            self._handed.clear()

    def make_unroutable(self, *topics: str) -> None:
        """Reject messages to these topics from now on, as RabbitMQ returns unroutable ones."""
        with self._lock:
            self._unroutable.update(topics)

    def make_routable(self, *topics: str) -> None:
        """Accept messages to these topics again."""
        with self._lock:
            self._unroutable.difference_update(topics)

    def fail_message(
        self,
        message_id: uuid.UUID | str,
        *,
        outcome: Outcome = Outcome.REJECTED,
        error: str = "rejected by the in-memory broker (simulated failure)",
        times: int | None = None,
    ) -> None:
        """Make publishing this message id fail with ``outcome``.

        ``times`` is how many publish attempts fail before it is accepted (None: every one).
        """
        if outcome is Outcome.CONFIRMED:
            raise ValueError("outcome must be Outcome.REJECTED or Outcome.UNAVAILABLE")
        if times is not None and times < 1:
            raise ValueError("times must be a positive number of attempts, or None for always")
        with self._lock:
            self._failures[uuid.UUID(str(message_id))] = _Failure(outcome, error, times)

    def clear_failures(self) -> None:
        """Stop failing the message ids given to :meth:`fail_message`."""
        with self._lock:
            self._failures.clear()

    @property
    def available(self) -> bool:
        """False during a simulated outage."""
        return self._outage is None

    def start_outage(self, reason: str = DEFAULT_OUTAGE_REASON) -> None:
        """Simulate an outage: connect() raises, publish() reports UNAVAILABLE."""
        self._outage = reason

    def end_outage(self) -> None:
        """End a simulated outage."""
        self._outage = None

    @contextlib.contextmanager
    def outage(self, reason: str = DEFAULT_OUTAGE_REASON) -> Iterator[None]:
        """A simulated outage for the duration of a ``with`` block."""
        self.start_outage(reason)
        try:
            yield
        finally:
            self.end_outage()

    def _check_available(self) -> None:
        reason = self._outage
        if reason is not None:
            raise BrokerUnavailableError(reason)

    def _accept(self, batch: Sequence[Message]) -> list[PublishResult]:
        with self._lock:
            outage = self._outage
            if outage is not None:
                return [PublishResult(Outcome.UNAVAILABLE, outage)] * len(batch)
            return [self._accept_one(message) for message in batch]

    def _accept_one(self, message: Message) -> PublishResult:
        failure = self._failures.get(message.id)
        if failure is not None:
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining == 0:
                    del self._failures[message.id]
            return PublishResult(failure.outcome, failure.error)
        if message.topic in self._unroutable:
            return PublishResult(
                Outcome.REJECTED,
                f"unroutable: topic {message.topic!r} is marked unroutable on the in-memory "
                "broker; make it routable or dead-letter the message",
            )
        limit = self.max_message_bytes
        if limit is not None and (size := wire_size(message)) > limit:
            return too_large(size, limit, "the in-memory broker's max_message_bytes")
        self._messages.append(_copy(message))
        return CONFIRMED


class MemoryPublisher:
    """A Publisher into a :class:`MemoryBroker`; publish() connects by itself if needed."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        """The broker this publisher publishes into."""
        self._connected = False

    @property
    def connected(self) -> bool:
        """True between a successful connect() and close()."""
        return self._connected

    async def connect(self) -> None:
        """Connect; raise BrokerUnavailableError during a simulated outage."""
        self.broker._check_available()
        self._connected = True

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        """Store each routable message and return one result per message, in order."""
        if not batch:
            return []
        await asyncio.sleep(0)
        if not self._connected:
            try:
                await self.connect()
            except BrokerUnavailableError as exc:
                return [PublishResult(Outcome.UNAVAILABLE, str(exc))] * len(batch)
        results = self.broker._accept(batch)
        if any(r.outcome is Outcome.UNAVAILABLE for r in results) and not self.broker.available:
            self._connected = False
        return results

    async def close(self) -> None:
        """Close the publisher; a later publish() connects again."""
        self._connected = False


def _copy(message: Message) -> Message:
    # Message is frozen and its payload is decoded from bytes on each access: only the
    # headers mapping could be shared with a caller.
    return dataclasses.replace(message, headers=dict(message.headers))


class MemoryDelivery:
    """One message handed out by a :class:`MemorySubscriber`."""

    lane: object = None
    epoch: int | None = None
    redeliverable = True
    revoked = False
    """Never: a queue has no lanes to lose."""

    def __init__(
        self,
        subscriber: MemorySubscriber,
        message: Message,
        attempt: int,
        index: int | None = None,
        *,
        redelivered: bool = False,
    ) -> None:
        self._subscriber = subscriber
        self.redelivered = redelivered
        """True if it was handed out before and given back unsettled (released, or a
        subscriber of the same consumer stopped without settling it)."""
        self.index = index
        """Its place in the broker's store (None for messages given to ``deliver()``)."""
        self.message = message
        """The message as it was published."""
        self.topic = message.topic
        self.body = message.body
        self.headers = message.wire_headers()
        self.key = message.key
        self.broker_message_id: str | None = str(message.id)
        self.content_type: str | None = message.content_type
        self.attempt = attempt
        self.settled: str | None = None
        """``acked``, ``retried``, ``released`` or ``dead_lettered`` once settled."""

    async def ack(self) -> None:
        """Mark it acknowledged."""
        self.settled = "acked"
        self._subscriber.acked.append(self.message)
        self._subscriber._settle(self)

    async def release(self) -> bool:
        """Give it back unsettled: it is handed out again at once, as the same attempt."""
        self.settled = "released"
        self._subscriber._redeliver(self.message, self.attempt, 0.0, self.index, redelivered=True)
        return True

    async def retry_later(self, delay: float, error: str) -> None:
        """Deliver it again after ``delay`` seconds as the next attempt."""
        self.settled = "retried"
        self._subscriber._redeliver(self.message, self.attempt + 1, delay, self.index)

    async def dead_letter(self, error: str, attempts: int) -> None:
        """Store a copy on ``<consumer>.dead-letter`` with the error headers, then ack."""
        from postroom.brokers.base import dead_letter_headers, dead_letter_name

        consumer = self._subscriber.consumer or "consumer"
        headers = dead_letter_headers(self, consumer, error, attempts)
        for name in HEADER_ID_NAMES:
            headers.pop(name, None)
        copy = dataclasses.replace(
            self.message, topic=dead_letter_name(consumer), headers=headers, body=self.body
        )
        with self._subscriber.broker._lock:
            self._subscriber.broker._messages.append(copy)
        self.settled = "dead_lettered"
        self._subscriber.dead_lettered.append(copy)
        self._subscriber._settle(self)


#: Wire headers a Message regenerates from its fields (not kept in a dead-letter copy's headers).
HEADER_ID_NAMES: Final = ENVELOPE_HEADERS


class MemorySubscriber:
    """A Subscriber on a :class:`MemoryBroker`: it hands out the messages published to the
    subscribed topics (from the first one stored, except those its consumer already
    acknowledged or dead-lettered), plus any given to :meth:`deliver`.

    Retries come back after their delay; dead-lettered copies are stored on the broker
    under ``<consumer>.dead-letter`` and listed in :attr:`dead_lettered`.
    """

    def __init__(self, broker: MemoryBroker, *, poll_interval: float = 0.01) -> None:
        self.broker = broker
        self.consumer: str | None = None
        self.topics: set[str] = set()
        self.poll_interval = poll_interval
        self.acked: list[Message] = []
        """Messages acknowledged, in order."""
        self.dead_lettered: list[Message] = []
        """Dead-lettered copies, in order."""
        self._queue: asyncio.Queue[MemoryDelivery] = asyncio.Queue()
        self._cursor = 0
        self._closed = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self, consumer: str, topics: Sequence[str]) -> None:
        """Subscribe; raise BrokerUnavailableError during a simulated outage."""
        self.broker._check_available()
        self.consumer = consumer
        self.topics = set(topics)
        self._closed.clear()

    def deliver(self, message: Message, *, attempt: int | None = None) -> MemoryDelivery:
        """Hand ``message`` out (again), whatever its topic; returns the delivery."""
        from postroom.brokers.base import attempts_made

        number = attempt if attempt is not None else attempts_made(dict(message.headers)) + 1
        delivery = MemoryDelivery(self, _copy(message), number)
        self._queue.put_nowait(delivery)
        return delivery

    async def deliveries(self) -> AsyncIterator[MemoryDelivery]:
        """The deliveries, until close()."""
        while not self._closed.is_set():
            self._take_published()
            try:
                async with asyncio.timeout(self.poll_interval):
                    delivery = await self._queue.get()
            except TimeoutError:
                continue
            yield delivery

    async def lag(self) -> dict[tuple[str, int | None], int]:
        """Messages of the subscribed topics not yet handed out (stored on the broker or
        waiting in this subscriber), as ``{(consumer, None): count}``; empty unless started."""
        if self.consumer is None or self._closed.is_set():
            return {}
        with self.broker._lock:
            fresh = self.broker._messages[self._cursor :]
            waiting = sum(1 for message in fresh if message.topic in self.topics)
        return {(self.consumer, None): waiting + self._queue.qsize()}

    async def close(self) -> None:
        """Stop handing out deliveries and cancel pending retries."""
        self._closed.set()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _take_published(self) -> None:
        with self.broker._lock:
            start = self._cursor
            fresh = self.broker._messages[start:]
            self._cursor = len(self.broker._messages)
            settled = set(self.broker._settled.get(self.consumer or "", ()))
            handed = self.broker._handed.setdefault(self.consumer or "", set())
            for index, message in enumerate(fresh, start):
                if message.topic in self.topics and index not in settled:
                    before = index in handed
                    handed.add(index)
                    self._queue.put_nowait(
                        MemoryDelivery(self, _copy(message), 1, index, redelivered=before)
                    )

    def _settle(self, delivery: MemoryDelivery) -> None:
        """Remember that this consumer settled it: a later subscriber of it skips it."""
        if delivery.index is not None and self.consumer is not None:
            with self.broker._lock:
                self.broker._settled.setdefault(self.consumer, set()).add(delivery.index)

    def _redeliver(
        self,
        message: Message,
        attempt: int,
        delay: float,
        index: int | None = None,
        *,
        redelivered: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()

        def put() -> None:
            self._timers.discard(timer)
            if not self._closed.is_set():
                self._queue.put_nowait(
                    MemoryDelivery(self, message, attempt, index, redelivered=redelivered)
                )

        timer = loop.call_later(delay, put)
        self._timers.add(timer)


class MemoryDeadLetters:
    """The dead letters of one consumer on a :class:`MemoryBroker` (its topic
    ``<consumer>.dead-letter``); requeue stores a copy on the message's original topic,
    marked for this consumer only, and removes the dead letter."""

    order_note = "Listing changes nothing: dead letters are listed in the order they came."

    def __init__(self, broker: MemoryBroker, consumer: str) -> None:
        from postroom.brokers.base import HEADER_FOR_CONSUMER, dead_letter_name

        self.broker = broker
        self.consumer = consumer
        self.topic = dead_letter_name(consumer)
        self.where = f"in-memory topic {self.topic!r}"
        self.target = (
            f"each message's original topic, marked for {consumer!r} only "
            f"({HEADER_FOR_CONSUMER} header)"
        )

    async def browse(self, limit: int | None) -> Listing:
        """The first ``limit`` dead letters (all with None), without payloads."""
        letters = [letter.without_payload() for letter in self._letters()]
        shown = letters if limit is None else letters[:limit]
        return Listing(shown, len(letters), missing=not letters)

    async def find(self, name: str) -> Found:
        """The first dead letter called ``name`` (its id or ``#N``)."""
        return first_match(self._letters(), name)

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        """Store a copy of each selected dead letter (by id) on its original topic for this
        consumer, then stop listing the dead letter (the broker's log keeps it)."""
        from postroom.brokers.base import HEADER_FOR_CONSUMER
        from postroom.brokers.dead_letters import DEAD_LETTER_HEADERS

        wanted = {letter.id for letter in selected}
        report = Requeued()
        found: set[str] = set()
        for index, letter in self._indexed():
            if letter.id not in wanted or letter.id in found:
                continue
            found.add(letter.id)
            if letter.topic is None:
                report.failures.append((letter.without_payload(), "it has no topic header"))
                continue
            headers = {
                k: v
                for k, v in letter.headers.items()
                if k not in DEAD_LETTER_HEADERS and k != HEADER_TOPIC
            }
            headers[HEADER_FOR_CONSUMER] = self.consumer
            with self.broker._lock:
                original = self.broker._messages[index]
                self.broker._messages.append(
                    dataclasses.replace(original, topic=letter.topic, headers=headers)
                )
                self.broker._requeued.add(index)
            report.requeued.append(letter.without_payload())
        report.vanished = [letter for letter in selected if letter.id not in found]
        return report

    def _letters(self) -> Iterator[DeadLetter]:
        return (letter for _, letter in self._indexed())

    def _indexed(self) -> Iterator[tuple[int, DeadLetter]]:
        with self.broker._lock:
            listed = [
                (index, message)
                for index, message in enumerate(self.broker._messages)
                if message.topic == self.topic and index not in self.broker._requeued
            ]
        for number, (index, message) in enumerate(listed):
            yield index, self._letter(message, number)

    def _letter(self, message: Message, index: int) -> DeadLetter:
        return DeadLetter(
            id=str(message.id),
            position=f"#{index + 1}",
            body=message.body,
            headers=dict(message.headers),
            content_type=message.content_type,
            key=message.key,
            broker_timestamp=message.created_at,
        )
