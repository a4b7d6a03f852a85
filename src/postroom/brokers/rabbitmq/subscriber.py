"""RabbitMQ subscriber: a durable queue per consumer, with retry and dead-letter queues."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq

from postroom.brokers.rabbitmq.acks import AckWindow
from postroom.brokers.rabbitmq.publisher import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EXCHANGE,
    _address,
    _log,
    describe_amqp_error,
    refusal,
)
from postroom.brokers.rabbitmq.tls import connection_url
from postroom.brokers.rabbitmq.topology import (
    Queue,
    consumer_topology,
    declare,
    declare_retry_queue,
    retry_queue_advice,
    retry_queue_arguments,
    retry_queue_name,
    retry_tier_ms,
)
from postroom.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    DeliveryLostError,
    RefusedSettingError,
)
from postroom.urls import redact_url

#: Seconds after which a retry queue in use is declared again before a publish to it:
#: publishing does not count as use, only declaring (and consuming) does.
RETRY_QUEUE_REDECLARE_SECONDS = 60 * 60.0


def _header_text(value: Any, *, dates: bool = False) -> str | None:
    """A header value as text; None for other types (dates too, unless ``dates``)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    if dates and isinstance(value, datetime):
        return value.isoformat()
    return None


def own_copy(incoming: Any) -> bool:
    """True if ``incoming`` reached the queue through the default exchange (``""``).

    postroom's copies come that way only: a retry copy is dead-lettered back by its retry
    queue to ``x-dead-letter-exchange: ""``, and ``postroom dead-letter requeue`` publishes
    to the default exchange with the queue's name as routing key. Messages of producers
    arrive through the topic exchange, whose name RabbitMQ puts in the delivery, so no
    header a producer sets can make its message look like a copy. Only a client allowed to
    write to the default exchange (``amq.default``) can publish to the queue directly:
    deny that in RabbitMQ's permissions to producers that are not trusted.
    """
    return not (incoming.exchange or "")


class RabbitMQDelivery:
    """One message from a RabbitMQ queue; settled on the channel it came from."""

    lane: object = None
    epoch: int | None = None
    redeliverable = True
    revoked = False
    """Never: a queue has no lanes to lose."""

    def __init__(self, subscriber: RabbitMQSubscriber, incoming: Any, window: AckWindow) -> None:
        from postroom.brokers.base import (
            HEADER_ATTEMPTS,
            HEADER_FOR_CONSUMER,
            HEADER_TOPIC,
            attempts_made,
        )

        self._subscriber = subscriber
        self._incoming = incoming
        self._window = window
        self._tag = int(incoming.delivery_tag)
        headers = {
            str(name): text
            for name, value in (incoming.headers or {}).items()
            if (text := _header_text(value)) is not None
        }
        # Requeue copies go to the consumer's own queue here: the header means nothing.
        headers.pop(HEADER_FOR_CONSUMER, None)
        claimed_topic = headers.pop(HEADER_TOPIC, "")
        if own_copy(incoming):
            # postroom's own retry or requeue copy: the topic it came on travels in a header.
            self.topic: str = claimed_topic or incoming.routing_key or ""
        else:
            # Routed by the topic exchange: the routing key decides the handler, whatever
            # headers the producer set; attempts are counted from this delivery on.
            self.topic = incoming.routing_key or ""
            headers.pop(HEADER_ATTEMPTS, None)
        self.headers = headers
        self.redelivered: bool = bool(incoming.redelivered)
        """RabbitMQ's flag: handed out before and not acknowledged (the consumer holding it
        closed its channel, died, or released it)."""
        self.body: bytes = incoming.body
        self.key: str | None = None
        self.broker_message_id: str | None = incoming.message_id
        self.content_type: str | None = incoming.content_type
        self.attempt = attempts_made(headers) + 1

    async def ack(self) -> None:
        """basic.ack on the channel the message came from, covering with one frame the
        settled deliveries before it that it may (see :mod:`.acks`)."""
        await self._window.ack(self._tag)

    def settle_for_later_ack(self) -> None:
        """Count it settled without a frame: the ack of a later delivery of the same batch
        sends it (see :mod:`.acks`)."""
        self._window.settle(self._tag)

    async def release(self) -> bool:
        """Give it back unsettled: basic.nack with requeue, so RabbitMQ delivers it again."""
        if self._channel_lost():
            return True  # RabbitMQ requeued it when its channel closed
        with contextlib.suppress(aio_pika.exceptions.MessageProcessError):  # already settled
            await self._window.alone(self._tag, self._requeue)
        return True

    async def _requeue(self) -> None:
        await self._incoming.nack(requeue=True)

    async def retry_later(self, delay: float, error: str) -> None:
        """Publish a copy (confirmed) to the retry queue for ``delay``, then ack this one."""
        from postroom.brokers.base import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_TOPIC

        self._check_channel()
        headers = dict(self.headers)
        headers[HEADER_TOPIC] = self.topic
        headers[HEADER_ATTEMPTS] = str(self.attempt)
        headers[HEADER_ERROR] = error[:2000]
        queue = await self._subscriber._retry_queue(delay)

        async def declare() -> None:
            self._subscriber._retry_queues.discard(queue)
            await self._subscriber._retry_queue(delay)

        await self._subscriber._publish(self, queue, headers, declare, expiration=delay)
        await self._ack_after_copy("retry")

    async def dead_letter(self, error: str, attempts: int) -> None:
        """Publish a copy (confirmed) to ``<queue>.dead-letter`` with the error, then ack.

        Raises DeliveryLostError, without publishing, if the channel the message came on is
        already closed (RabbitMQ delivers it again). Once the copy is confirmed, a failing
        ack is only logged: the copy must not be published twice.
        """
        from postroom.brokers.base import dead_letter_headers, dead_letter_name

        self._check_channel()
        name = self._subscriber.queue_name
        headers = dead_letter_headers(self, name, error, attempts)
        queue = dead_letter_name(name)

        async def declare_again() -> None:
            await declare(self._subscriber._channel, Queue(queue))

        await self._subscriber._publish(self, queue, headers, declare_again)
        await self._ack_after_copy("dead-letter")

    def _channel_lost(self) -> bool:
        try:
            return bool(self._incoming.channel.is_closed)
        except aiormq.exceptions.ChannelInvalidStateError:
            return True

    def _check_channel(self) -> None:
        if self._channel_lost():
            raise DeliveryLostError(
                "the channel this message came on is closed (the connection was reopened); "
                "RabbitMQ delivers it again"
            )

    async def _ack_after_copy(self, what: str) -> None:
        try:
            await self._window.alone(self._tag, self._incoming.ack)
        except Exception as exc:
            # The copy is stored; RabbitMQ redelivers the original (its channel is gone),
            # which the inbox or the retry policy takes care of.
            _log.warning(
                f"ack after the {what} copy failed",
                queue=self._subscriber.queue_name,
                error=self._subscriber._describe(exc),
            )


class RabbitMQSubscriber:
    """Consumes a durable queue named after the consumer, bound to its topics.

    Declares the durable topic exchange the relay publishes to, the queue ``<name>`` bound
    to each handled topic, ``<name>.dead-letter``, and (on first use) retry queues
    ``<name>.retry.<ms>ms`` that dead-letter back to ``<name>`` when a message's delay is
    over. Copies to retry and dead-letter queues are published with confirms before the
    original is acknowledged. ``prefetch`` bounds the unacknowledged messages.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = DEFAULT_EXCHANGE,
        prefetch: int = 32,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"amqp", "amqps"}:
            raise ConfigurationError(
                "a RabbitMQ URL must start with amqp:// or amqps://, "
                "e.g. amqp://user:password@host:5672/vhost"
            )
        self._url = connection_url(url)
        self.exchange = exchange
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        self.address = _address(parts)
        self.queue_name = ""
        self._connection: Any = None
        self._channel: Any = None
        # Passive declarations for lag() go on a channel of their own: RabbitMQ closes the
        # channel of one that fails (the queue was deleted), which must not be the one the
        # deliveries come on.
        self._lag_channel: Any = None
        self._queue: asyncio.Queue[RabbitMQDelivery] = asyncio.Queue()
        self._retry_queues: set[str] = set()
        self._retry_declared: dict[str, float] = {}
        self._closed = asyncio.Event()
        self._window = AckWindow()
        self._window_channel: Any = None
        """The channel whose deliveries ``_window`` holds."""

    def __repr__(self) -> str:
        return f"RabbitMQSubscriber({redact_url(self._url)!r}, queue={self.queue_name!r})"

    async def start(self, consumer: str, topics: Sequence[str]) -> None:
        """Connect (robustly: it reconnects by itself), declare and bind, start consuming."""
        self.queue_name = consumer
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                timeout=self.connect_timeout,
                client_properties={"connection_name": f"postroom consumer {consumer}"},
            )
            # on_return_raises: a retry or dead-letter copy RabbitMQ returns as unroutable
            # is a failure, so the original is not acknowledged.
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self._channel.set_qos(prefetch_count=self.prefetch)
            declared: dict[tuple[str, str], Any] = {}
            for declaration in consumer_topology(consumer, topics, exchange=self.exchange):
                await declare(self._channel, declaration, declared)
            await declared["queue", consumer].consume(self._on_message)
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            await self.close()
            refused = self._refusal(exc)
            if refused is not None:
                raise RefusedSettingError(refused) from None
            raise BrokerUnavailableError(
                f"cannot subscribe at RabbitMQ {self.address}: {self._describe(exc)}; check that "
                "RabbitMQ is running and the broker URL (POSTROOM_BROKER_URL) is right"
            ) from None
        self._closed.clear()
        _log.info("subscribed", broker=self.address, queue=consumer, topics=list(topics))

    def _refusal(self, exc: BaseException) -> str | None:
        """The sentence for a connection RabbitMQ refused (login, virtual host, permission):
        misconfiguration, which waiting does not cure; None for outages."""
        refused = refusal(exc, self.address, self._url)
        if refused is not None:
            return str(refused)
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return (
                f"RabbitMQ at {self.address} refused access ({self._describe(exc)}); grant the "
                "user configure, write and read permissions on the exchange and the consumer's "
                "queues"
            )
        return None

    async def _on_message(self, incoming: Any) -> None:
        if incoming.channel is not self._window_channel:
            # A new channel (the connection was reopened): its delivery tags start afresh.
            self._window, self._window_channel = AckWindow(), incoming.channel
        # First of all, so that a delivery that fails to be read is never acknowledged by
        # a later one's multiple ack.
        self._window.received(incoming)
        await self._queue.put(RabbitMQDelivery(self, incoming, self._window))

    async def deliveries(self) -> AsyncIterator[RabbitMQDelivery]:
        """The deliveries, until close()."""
        while not self._closed.is_set():
            try:
                async with asyncio.timeout(0.5):
                    delivery = await self._queue.get()
            except TimeoutError:
                continue
            yield delivery

    async def lag(self) -> dict[tuple[str, int | None], int]:
        """The ready messages of the consumer's queue (a passive declaration), as
        ``{(queue, None): count}``; empty unless subscribed. Messages handed to a consumer
        and not yet acknowledged are not counted (RabbitMQ counts them apart)."""
        connection = self._connection
        if connection is None or self._closed.is_set() or not self.queue_name:
            return {}
        if self._lag_channel is None:
            # Opened once per connection and never replaced: the robust connection restores
            # it after a reconnect (a channel opened per failed sample would pile up there).
            self._lag_channel = connection.channel(publisher_confirms=False)
        channel = self._lag_channel
        async with asyncio.timeout(self.connect_timeout):
            if not channel.is_initialized:
                await channel
            # On the underlying channel: aio-pika's robust channel answers a repeated
            # passive declaration from its cache, with the first count.
            underlay = await channel.get_underlay_channel()
            declared = await underlay.queue_declare(self.queue_name, passive=True)
        return {(self.queue_name, None): int(declared.message_count or 0)}

    async def close(self) -> None:
        """Close the connection; unacknowledged messages return to the queue."""
        self._closed.set()
        self._lag_channel = None
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.connect_timeout):
                    await connection.close()

    async def _retry_queue(self, delay: float) -> str:
        name = retry_queue_name(self.queue_name, delay)
        declared = self._retry_declared.get(name)
        stale = declared is None or time.monotonic() - declared > RETRY_QUEUE_REDECLARE_SECONDS
        if name not in self._retry_queues or stale:
            await self._declare_retry_queue(name, retry_tier_ms(delay))
            self._retry_queues.add(name)
            self._retry_declared[name] = time.monotonic()
        return name

    async def _declare_retry_queue(self, name: str, tier_ms: int) -> None:
        """Declare a retry queue that expires when unused, on a channel of its own.

        A queue of the same name declared by an older postroom without ``x-expires`` makes
        RabbitMQ refuse the declaration (PRECONDITION_FAILED) and close that channel. Then
        the existing queue is used as it is: deleting it could drop messages waiting in it,
        so the operator is told to delete it once it is empty.
        """
        queue = Queue(name, retry_queue_arguments(self.queue_name, tier_ms))
        if not await declare_retry_queue(self._connection, queue):
            await self._channel.declare_queue(name, passive=True)
            if name not in self._retry_queues:
                _log.warning(
                    "retry queue declared without expiry",
                    queue=name,
                    action=retry_queue_advice(name),
                )

    async def _publish(
        self,
        delivery: RabbitMQDelivery,
        queue: str,
        headers: dict[str, str],
        declare: Callable[[], Awaitable[None]],
        *,
        expiration: float | None = None,
    ) -> None:
        incoming = delivery._incoming
        message = aio_pika.Message(
            delivery.body,
            headers=dict(headers),
            content_type=incoming.content_type,
            message_id=incoming.message_id,
            timestamp=incoming.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=max(0.001, expiration) if expiration is not None else None,
        )
        exchange = self._channel.default_exchange
        try:
            await exchange.publish(message, routing_key=queue, mandatory=True)
        except aiormq.exceptions.PublishError:
            # Returned as unroutable: the queue is gone (deleted while we run). Declare it
            # again and publish once more; a second return raises.
            _log.warning("queue missing, declaring it again", queue=queue)
            await declare()
            await exchange.publish(message, routing_key=queue, mandatory=True)

    def _describe(self, exc: BaseException) -> str:
        return describe_amqp_error(exc, self._url)
