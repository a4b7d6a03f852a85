"""RabbitMQ publisher: aio-pika with publisher confirms, ``mandatory`` and persistent delivery."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import SplitResult, unquote, urlsplit

from postroom.brokers.base import CONFIRMED, Outcome, PublishResult
from postroom.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    DeliveryLostError,
    MissingExtraError,
)
from postroom.log import get_logger
from postroom.message import Message
from postroom.urls import redact_url

try:
    import aio_pika
    import aiormq
    import aiormq.abc
    from pamqp.commands import Basic
except ImportError:
    raise MissingExtraError("aio-pika", "rabbitmq") from None

#: Name of the topic exchange messages are published to.
DEFAULT_EXCHANGE: Final = "postroom"
#: Seconds to wait for the publisher confirms of a batch.
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0
#: Seconds to wait for a connection (TCP, AMQP handshake and login).
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Largest body sent; keep it at or below the broker's ``max_message_size``.
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
#: Exchange names postroom accepts (RabbitMQ's own rule, without the empty default exchange).
EXCHANGE_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,255}")
_BROKER_SIZE_LIMIT: Final = re.compile(r"larger than configured max size (\d+)")
# wait=False lets a publish return once its frames are queued instead of after each drain.
_NO_DRAIN: Final[dict[str, Any]] = (
    {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_publish).parameters else {}
)

_log = get_logger("brokers.rabbitmq")


class RabbitMQPublisher:
    """Publishes to a durable topic exchange with publisher confirms and ``mandatory=True``.

    Each message goes to ``exchange`` with routing key = its topic, persistent, with
    ``message_id``, ``content_type``, ``timestamp`` and the postroom headers. A batch is
    pipelined on one channel in order, then every confirm is awaited: an unroutable return
    or a nack is REJECTED; a confirm timeout or a lost connection is UNAVAILABLE. The
    connection is not "robust": a failure is reported, and the next publish() reconnects.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = DEFAULT_EXCHANGE,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"amqp", "amqps"}:
            raise ConfigurationError(
                "a RabbitMQ URL must start with amqp:// or amqps:// (this one has scheme "
                f"{parts.scheme!r}), e.g. amqp://user:password@host:5672/vhost"
            )
        if not EXCHANGE_PATTERN.fullmatch(exchange):
            raise ConfigurationError(
                f"exchange name {exchange!r} may only contain letters, digits and '.', '_', "
                "':' or '-' (1 to 255 characters)"
            )
        for name, seconds in (
            ("confirm_timeout", confirm_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not seconds > 0:
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds, not {seconds}"
                )
        if max_message_bytes <= 0:
            raise ConfigurationError(
                f"max_message_bytes must be a positive number of bytes, got {max_message_bytes}"
            )
        self._url = url
        self._password = parts.password or ""
        self.exchange = exchange
        """Name of the durable topic exchange messages are published to."""
        self.confirm_timeout = confirm_timeout
        """Seconds to wait for the confirms of a batch before reporting UNAVAILABLE."""
        self.connect_timeout = connect_timeout
        """Seconds to wait for a connection."""
        self.max_message_bytes = max_message_bytes
        """Larger bodies are REJECTED unsent (RabbitMQ would close the channel on them)."""
        self.address = _address(parts)
        """``host:port`` (and vhost) of the broker for messages; never includes the password."""
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._stale = False
        self._connect_lock = asyncio.Lock()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"RabbitMQPublisher({redact_url(self._url)!r}, exchange={self.exchange!r})"

    async def connect(self) -> None:
        """Connect, open a confirming channel and declare the exchange.

        Raises BrokerUnavailableError naming the broker and the reason if that fails.
        """
        await self._ready()

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        """Publish ``batch`` pipelined, in order, and return one result per message."""
        if not batch:
            return []
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._publish(batch)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def close(self) -> None:
        """Wait (up to the confirm timeout) for publishes in flight, then close."""
        try:
            await asyncio.wait_for(self._idle.wait(), self.confirm_timeout)
        except TimeoutError:
            _log.warning("closing with publishes in flight", broker=self.address)
        async with self._connect_lock:
            await self._drop()

    async def bind_queue(
        self, queue: str, routing_key: str = "#", *, arguments: dict[str, Any] | None = None
    ) -> None:
        """Declare a durable ``queue`` bound to the exchange with ``routing_key``.

        The binding pattern follows topic-exchange rules (``*`` one word, ``#`` any).
        Messages published before a queue is bound to their topic are returned unroutable.
        """
        await self._ready()
        assert self._channel is not None
        declared = await self._channel.declare_queue(queue, durable=True, arguments=arguments)
        await declared.bind(self.exchange, routing_key=routing_key)

    async def _publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        results: dict[int, PublishResult] = {
            index: self._too_large(message, self.max_message_bytes)
            for index, message in enumerate(batch)
            if len(message.body) > self.max_message_bytes
        }
        if len(results) == len(batch):
            return [results[index] for index in range(len(batch))]
        try:
            channel = await self._ready()
        except BrokerUnavailableError as exc:
            unavailable = PublishResult(Outcome.UNAVAILABLE, str(exc))
            return [results.get(index, unavailable) for index in range(len(batch))]
        sent: dict[asyncio.Task[Any], int] = {}
        for index, message in enumerate(batch):
            if index in results:
                continue
            # Tasks start in creation order and queue FIFO on the channel lock, so the
            # frames reach the socket in batch order.
            task = asyncio.ensure_future(
                channel.basic_publish(
                    message.body,
                    exchange=self.exchange,
                    routing_key=message.topic,
                    properties=_properties(message),
                    mandatory=True,
                    **_NO_DRAIN,
                )
            )
            sent[task] = index
        if sent:
            try:
                _, late = await asyncio.wait(sent, timeout=self.confirm_timeout)
            finally:
                for task in sent:
                    task.cancel()
            if late:
                self._stale = True
            for task, index in sent.items():
                if task in late:
                    results[index] = PublishResult(
                        Outcome.UNAVAILABLE,
                        f"no publisher confirm from RabbitMQ at {self.address} within "
                        f"{self.confirm_timeout:g} s; the connection is reopened",
                    )
                else:
                    results[index] = self._outcome(task, batch[index])
        return [results[index] for index in range(len(batch))]

    def _outcome(self, task: asyncio.Task[Any], message: Message) -> PublishResult:
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if exc is None:
            answer = task.result()
            if isinstance(answer, Basic.Ack):
                return CONFIRMED
            return PublishResult(
                Outcome.REJECTED, f"RabbitMQ answered {answer!r} instead of a publisher confirm"
            )
        if isinstance(exc, aiormq.exceptions.PublishError):
            frame = exc.message.delivery if exc.message is not None else exc.frame
            code = getattr(frame, "reply_code", "?")
            text = getattr(frame, "reply_text", "")
            return PublishResult(
                Outcome.REJECTED,
                f"unroutable: RabbitMQ returned the message ({code} {text}): no queue is bound "
                f"to exchange {self.exchange!r} for routing key {message.topic!r}; bind a queue "
                "to that topic or dead-letter the message",
            )
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return PublishResult(
                Outcome.REJECTED,
                f"RabbitMQ refused the message with a negative confirm (basic.nack) on exchange "
                f"{self.exchange!r}, routing key {message.topic!r}: a queue may be full "
                "(x-overflow=reject-publish) or the broker failed to store it",
            )
        self._stale = self._stale or isinstance(exc, aiormq.exceptions.ChannelClosed)
        limit = _broker_size_limit(exc)
        if limit is not None and len(message.body) > limit:
            return self._too_large(message, limit)
        if isinstance(
            exc,
            aiormq.exceptions.AMQPError
            | aiormq.exceptions.ChannelInvalidStateError
            | OSError
            | TimeoutError
            | asyncio.CancelledError,
        ):
            return PublishResult(
                Outcome.UNAVAILABLE,
                f"connection to RabbitMQ at {self.address} failed before the confirm "
                f"({self._describe(exc)}); it is reopened on the next publish",
            )
        return PublishResult(
            Outcome.REJECTED, f"could not publish the message: {self._describe(exc)}"
        )

    def _too_large(self, message: Message, limit: int) -> PublishResult:
        return PublishResult(
            Outcome.REJECTED,
            f"message body is {len(message.body)} bytes, over the {limit}-byte limit for "
            f"RabbitMQ at {self.address}; send a reference to the data instead, or raise "
            "max_message_bytes together with RabbitMQ's max_message_size",
        )

    async def _ready(self) -> aiormq.abc.AbstractChannel:
        async with self._connect_lock:
            try:
                return await self._reuse_or_reconnect()
            except BrokerUnavailableError:
                await self._drop()
                raise

    async def _reuse_or_reconnect(self) -> aiormq.abc.AbstractChannel:
        if self._stale:
            await self._drop()
        connection = self._connection
        if connection is None or connection.is_closed:
            await self._drop()
            await self._open_connection()
        elif self._channel is None or self._channel.is_closed:
            await self._open_channel()
        assert self._channel is not None
        try:
            return await self._channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError as exc:
            raise self._unavailable(exc, "open a channel on") from None

    async def _open_connection(self) -> None:
        try:
            self._connection = await aio_pika.connect(
                self._url,
                timeout=self.connect_timeout,
                client_properties={"connection_name": "postroom publisher"},
            )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from None
        # aio-pika's plain Connection keeps is_closed False when the broker goes away;
        # its close callbacks are what report the loss.
        self._connection.close_callbacks.add(self._on_connection_lost)
        await self._open_channel()
        _log.info("connected", broker=self.address, exchange=self.exchange)

    async def _open_channel(self) -> None:
        assert self._connection is not None
        try:
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            self._stale = True
            raise BrokerUnavailableError(
                f"RabbitMQ at {self.address} has an exchange {self.exchange!r} that is not a "
                f"durable topic exchange ({self._describe(exc)}); delete it or choose another "
                "exchange name"
            ) from None
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            # ChannelInvalidStateError and "connection closed" are RuntimeErrors.
            self._stale = True
            raise self._unavailable(exc, "open a channel on") from None
        self._channel = channel
        self._stale = False

    def _on_connection_lost(self, connection: Any, reason: BaseException | None) -> None:
        if connection is self._connection:
            self._stale = True
            _log.warning("connection lost", broker=self.address, reason=self._describe(reason))

    async def _drop(self) -> None:
        connection, channel = self._connection, self._channel
        self._connection, self._channel, self._stale = None, None, False
        # The channel first: closing it waits for aio-pika's close callbacks, which
        # closing only the connection leaves running.
        for resource in (channel, connection):
            if resource is not None and not resource.is_closed:
                with contextlib.suppress(
                    aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError
                ):
                    await asyncio.wait_for(resource.close(), self.connect_timeout)

    def _unavailable(self, exc: BaseException, doing: str = "connect to") -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"cannot {doing} RabbitMQ at {self.address}: {self._describe(exc)}; check that "
            "RabbitMQ is running and that the broker URL (POSTROOM_BROKER_URL) is right"
        )

    def _describe(self, exc: BaseException | None) -> str:
        if exc is None:
            return "closed"
        text = str(exc) or repr(exc)
        if self._password:
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}"


def _properties(message: Message) -> Basic.Properties:
    return Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        message_id=str(message.id),
        timestamp=message.created_at,
        headers=dict(message.wire_headers()),
    )


def _address(parts: SplitResult) -> str:
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        raise ConfigurationError(
            f"RabbitMQ URL has an invalid port in {parts.netloc.rsplit('@', 1)[-1]!r}"
        ) from None
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return f"{host}:{port}" if vhost == "/" else f"{host}:{port} (vhost {vhost!r})"


def _broker_size_limit(exc: BaseException) -> int | None:
    match = _BROKER_SIZE_LIMIT.search(str(exc))
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- subscriber


def retry_queue_name(queue: str, delay: float) -> str:
    """The retry queue for ``delay``: ``<queue>.retry.<ms>ms``, ms a power of two (>= 16).

    A message waits in it for its own delay (per-message expiration, capped by the queue's
    TTL), then RabbitMQ dead-letters it back to ``queue``. Delays in one queue differ by at
    most half, so one waiting at the head never holds another back by more than that.
    """
    return f"{queue}.retry.{retry_tier_ms(delay)}ms"


def retry_tier_ms(delay: float) -> int:
    """The power-of-two number of milliseconds (at least 16) that holds ``delay``."""
    ms = max(1, round(delay * 1000))
    return max(16, 1 << (ms - 1).bit_length())


def _header_text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return None


class RabbitMQDelivery:
    """One message from a RabbitMQ queue; settled on the channel it came from."""

    lane: object = None
    redeliverable = True

    def __init__(self, subscriber: RabbitMQSubscriber, incoming: Any) -> None:
        from postroom.brokers.base import HEADER_TOPIC, attempts_made

        self._subscriber = subscriber
        self._incoming = incoming
        headers = {
            str(name): text
            for name, value in (incoming.headers or {}).items()
            if (text := _header_text(value)) is not None
        }
        self.topic: str = headers.pop(HEADER_TOPIC, "") or incoming.routing_key or ""
        self.headers = headers
        self.body: bytes = incoming.body
        self.key: str | None = None
        self.broker_message_id: str | None = incoming.message_id
        self.content_type: str | None = incoming.content_type
        self.attempt = attempts_made(headers) + 1

    async def ack(self) -> None:
        """basic.ack on the channel the message came from."""
        await self._incoming.ack()

    async def release(self) -> bool:
        """Give it back unsettled: basic.nack with requeue, so RabbitMQ delivers it again."""
        if self._channel_lost():
            return True  # RabbitMQ requeued it when its channel closed
        with contextlib.suppress(aio_pika.exceptions.MessageProcessError):  # already settled
            await self._incoming.nack(requeue=True)
        return True

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

        async def declare() -> None:
            await self._subscriber._channel.declare_queue(queue, durable=True)

        await self._subscriber._publish(self, queue, headers, declare)
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
            await self._incoming.ack()
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
        self._url = url
        self._password = parts.password or ""
        self.exchange = exchange
        self.prefetch = prefetch
        self.connect_timeout = connect_timeout
        self.address = _address(parts)
        self.queue_name = ""
        self._connection: Any = None
        self._channel: Any = None
        self._queue: asyncio.Queue[RabbitMQDelivery] = asyncio.Queue()
        self._retry_queues: set[str] = set()
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"RabbitMQSubscriber({redact_url(self._url)!r}, queue={self.queue_name!r})"

    async def start(self, consumer: str, topics: Sequence[str]) -> None:
        """Connect (robustly: it reconnects by itself), declare and bind, start consuming."""
        from postroom.brokers.base import dead_letter_name

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
            exchange = await self._channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._channel.declare_queue(consumer, durable=True)
            for topic in topics:
                await queue.bind(exchange, routing_key=topic)
            await self._channel.declare_queue(dead_letter_name(consumer), durable=True)
            await queue.consume(self._on_message)
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            await self.close()
            raise BrokerUnavailableError(
                f"cannot subscribe at RabbitMQ {self.address}: {self._describe(exc)}; check that "
                "RabbitMQ is running and the broker URL (POSTROOM_BROKER_URL) is right"
            ) from None
        self._closed.clear()
        _log.info("subscribed", broker=self.address, queue=consumer, topics=list(topics))

    async def _on_message(self, incoming: Any) -> None:
        await self._queue.put(RabbitMQDelivery(self, incoming))

    async def deliveries(self) -> AsyncIterator[RabbitMQDelivery]:
        """The deliveries, until close()."""
        while not self._closed.is_set():
            try:
                delivery = await asyncio.wait_for(self._queue.get(), 0.5)
            except TimeoutError:
                continue
            yield delivery

    async def close(self) -> None:
        """Close the connection; unacknowledged messages return to the queue."""
        self._closed.set()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self.connect_timeout)

    async def _retry_queue(self, delay: float) -> str:
        name = retry_queue_name(self.queue_name, delay)
        if name not in self._retry_queues:
            await self._channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue_name,
                    "x-message-ttl": retry_tier_ms(delay),
                },
            )
            self._retry_queues.add(name)
        return name

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
        text = str(exc) or repr(exc)
        if self._password:
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}"
