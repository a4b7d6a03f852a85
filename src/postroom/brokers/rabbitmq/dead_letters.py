"""A consumer's dead letters on RabbitMQ: the queue ``<consumer>.dead-letter``.

Reading takes messages with ``basic.get`` without acknowledging them and hands them all
back at the end with one ``basic.nack`` (``multiple``, ``requeue``); if the command dies,
the broker hands them back itself when the connection closes. A message handed back at
once would come straight back from the next ``basic.get``, so they stay unacknowledged
until the read is over: RabbitMQ holds them, and the client keeps only the message it
needs (the match, or none), so its memory does not grow with the queue. RabbitMQ puts
them back where they were when it can, but the order may change. Requeueing publishes a
copy (same message id, body and headers, without the dead-letter headers, so its attempts
start again) to the consumer's queue ``<consumer>`` through the default exchange, waits
for the publisher confirm, and only then acknowledges the dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq

from postroom.brokers.base import dead_letter_name
from postroom.brokers.dead_letters import (
    BROKER_TIMEOUT,
    DEAD_LETTER_HEADERS,
    DeadLetter,
    DeadLetterError,
    Found,
    Listing,
    Requeued,
    digest,
)
from postroom.brokers.rabbitmq.publisher import _address, describe_amqp_error
from postroom.brokers.rabbitmq.subscriber import _header_text
from postroom.brokers.rabbitmq.tls import connection_url
from postroom.errors import BrokerUnavailableError
from postroom.message import HEADER_CONTENT_TYPE, HEADER_ID, HEADER_KEY, OCTET_STREAM


class RabbitMQDeadLetters:
    """The queue ``<consumer>.dead-letter``, requeued to the queue ``<consumer>``."""

    order_note = (
        "Listing takes the messages without acknowledging them and hands them straight "
        "back; RabbitMQ keeps their place when it can, but the order may change."
    )

    def __init__(self, url: str, consumer: str) -> None:
        parts = urlsplit(url)
        self._url = connection_url(url)
        self.address = _address(parts)
        self.consumer = consumer
        self.queue = dead_letter_name(consumer)
        self.where = f"RabbitMQ queue {self.queue!r} at {self.address}"
        self.target = f"the queue {consumer!r} (through the default exchange)"

    async def browse(self, limit: int | None) -> Listing:
        """The first ``limit`` messages (all with None) without payloads, handed back."""
        async with self._connection() as connection:
            total = await self._count(connection, self.queue)
            if total is None:
                return Listing([], 0, missing=True)
            letters: list[DeadLetter] = []
            async with self._reading(connection) as queue:
                last: Any = None
                while limit is None or len(letters) < limit:
                    message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT)
                    if message is None:
                        break
                    letters.append(self._letter(message, len(letters)).without_payload())
                    last = message
                await self._hand_back(last)
        return Listing(letters, max(total, len(letters)))

    async def find(self, name: str) -> Found:
        """The first message called ``name`` among those there now, one message at a time."""
        async with self._connection() as connection:
            waiting = await self._count(connection, self.queue)
            if waiting is None:
                return Found(None, missing=True)
            found = Found(None)
            async with self._reading(connection) as queue:
                last: Any = None
                for index in range(waiting):
                    message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT)
                    if message is None:
                        break
                    last = message
                    letter = self._letter(message, index)
                    if letter.is_called(name):
                        found.copies += 1
                        found.letter = found.letter or letter
                await self._hand_back(last)
        return found

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        """Publish a confirmed copy of each selected message to the consumer's queue, then ack."""
        wanted = {letter.id for letter in selected}
        report = Requeued()
        found: set[str] = set()
        async with self._connection() as connection:
            if await self._count(connection, self.consumer) is None:
                raise DeadLetterError(
                    f"the consumer's queue {self.consumer!r} does not exist at {self.address}; "
                    "start the consumer once (`postroom consume ...`) so that it declares its "
                    "queue, then requeue; the dead letters were left where they are"
                )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            queue = await channel.declare_queue(self.queue, passive=True)
            # Look at no more than was there when we started, and requeue each id at most
            # once: a running consumer may dead-letter a copy again while this runs.
            waiting = queue.declaration_result.message_count or 0
            last_held: Any = None
            for index in range(waiting):
                message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT)
                if message is None:
                    break
                letter = self._letter(message, index)
                if letter.id not in wanted or letter.id in found:
                    last_held = message
                    continue
                found.add(letter.id)
                try:
                    # Waits for the publisher confirm; a return or nack raises.
                    await channel.default_exchange.publish(
                        self._copy(message),
                        routing_key=self.consumer,
                        mandatory=True,
                        timeout=BROKER_TIMEOUT,
                    )
                except Exception as exc:
                    report.failures.append((letter.without_payload(), self._describe(exc)))
                    last_held = message
                    if channel.is_closed:
                        break  # what is not acknowledged goes back when the connection closes
                    continue
                await message.ack()
                report.requeued.append(letter.without_payload())
            if not channel.is_closed:
                await self._hand_back(last_held)
            with contextlib.suppress(Exception):
                await channel.close()
        report.vanished = [letter for letter in selected if letter.id not in found]
        return report

    def _describe(self, exc: BaseException) -> str:
        return describe_amqp_error(exc, self._url)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        try:
            connection = await aio_pika.connect(
                self._url,
                timeout=BROKER_TIMEOUT,
                client_properties={"connection_name": "postroom dead-letter"},
            )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            raise BrokerUnavailableError(
                f"cannot connect to RabbitMQ at {self.address}: {self._describe(exc)}; check "
                "that RabbitMQ is running and that --broker-url (POSTROOM_BROKER_URL) is right"
            ) from None
        try:
            yield connection
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise BrokerUnavailableError(
                f"RabbitMQ at {self.address} failed during the command: {self._describe(exc)}; "
                "messages not yet acknowledged stay on the dead-letter queue"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(BROKER_TIMEOUT):
                    await connection.close()

    @contextlib.asynccontextmanager
    async def _reading(self, connection: Any) -> AsyncIterator[Any]:
        channel = await connection.channel()
        try:
            yield await channel.declare_queue(self.queue, passive=True)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _hand_back(self, last: Any) -> None:
        """One frame hands back every message taken up to ``last`` (none if it is None)."""
        if last is not None:
            await last.nack(multiple=True, requeue=True)

    async def _count(self, connection: Any, name: str) -> int | None:
        """Ready messages in queue ``name``, or None if it does not exist."""
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        count = queue.declaration_result.message_count
        with contextlib.suppress(Exception):
            await channel.close()
        return int(count or 0)

    def _letter(self, message: Any, index: int) -> DeadLetter:
        headers = {
            str(name): text
            for name, value in (message.headers or {}).items()
            if (text := _header_text(value, dates=True)) is not None
        }
        # The postroom-id first: it is the id the consumer logs and its inbox records.
        message_id = headers.get(HEADER_ID) or message.message_id
        stamp = message.timestamp
        if isinstance(stamp, datetime) and stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return DeadLetter(
            id=message_id or digest(message.body, headers),
            position=f"#{index + 1}",
            body=message.body,
            headers=headers,
            content_type=message.content_type or headers.get(HEADER_CONTENT_TYPE) or OCTET_STREAM,
            key=headers.get(HEADER_KEY),
            broker_timestamp=stamp if isinstance(stamp, datetime) else None,
            broker_message_id=message.message_id,
        )

    def _copy(self, message: Any) -> aio_pika.Message:
        return aio_pika.Message(
            message.body,
            headers={
                name: value
                for name, value in (message.headers or {}).items()
                if name not in DEAD_LETTER_HEADERS
            },
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            type=message.type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
