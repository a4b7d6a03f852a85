"""RabbitMQ publisher: aio-pika with publisher confirms, ``mandatory`` and persistent delivery."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import SplitResult, unquote, urlsplit

import aio_pika
import aiormq
import aiormq.abc
from pamqp import frame as amqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from postroom.brokers.base import CONFIRMED, Outcome, PublishResult, too_large, wire_size
from postroom.brokers.rabbitmq.tls import connection_url, untrusted_certificate
from postroom.cloudevents import CloudEvents
from postroom.errors import BrokerRefusedError, BrokerUnavailableError, ConfigurationError
from postroom.log import get_logger
from postroom.message import Message
from postroom.urls import redact_url, scrub

#: Name of the topic exchange messages are published to.
DEFAULT_EXCHANGE: Final = "postroom"
#: Seconds to wait for the publisher confirms of a batch.
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0
#: Seconds to wait for a connection (TCP, AMQP handshake and login).
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Largest message sent (body, key and headers); keep it at or below the broker's
#: ``max_message_size``.
DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
#: Headers this far below ``frame_max`` (per name/value pair plus the fixed properties)
#: surely fit one frame; larger ones are measured exactly before sending.
_HEADER_ESTIMATE_OVERHEAD: Final = 6
_PROPERTIES_ESTIMATE_OVERHEAD: Final = 512
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
    With ``cloudevents``, messages of the topics it covers also carry the CloudEvents
    binary-mode headers (``cloudEvents_id``, ... and ``ce-id``, ...).
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = DEFAULT_EXCHANGE,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        cloudevents: CloudEvents | None = None,
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
        self._url = connection_url(url)
        self._password = parts.password or ""
        self.exchange = exchange
        """Name of the durable topic exchange messages are published to."""
        self.confirm_timeout = confirm_timeout
        """Seconds to wait for the confirms of a batch before reporting UNAVAILABLE."""
        self.connect_timeout = connect_timeout
        """Seconds to wait for a connection."""
        self.max_message_bytes = max_message_bytes
        """Larger messages (body, key and headers) are REJECTED unsent, permanently
        (RabbitMQ would close the channel on them)."""
        self.cloudevents = cloudevents
        """Which topics carry the CloudEvents headers (None: none)."""
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
            async with asyncio.timeout(self.confirm_timeout):
                await self._idle.wait()
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
        results: dict[int, PublishResult] = {}
        extra = [self._extra_headers(message) for message in batch]
        for index, message in enumerate(batch):
            size = wire_size(message, extra[index])
            if size > self.max_message_bytes:
                results[index] = too_large(
                    size,
                    self.max_message_bytes,
                    "max_message_bytes (and RabbitMQ's max_message_size)",
                )
        if len(results) == len(batch):
            return [results[index] for index in range(len(batch))]
        try:
            channel = await self._ready()
        except BrokerUnavailableError as exc:
            unavailable = PublishResult(Outcome.UNAVAILABLE, str(exc))
            return [results.get(index, unavailable) for index in range(len(batch))]
        frame_max = channel.connection.connection_tune.frame_max or 0
        properties: dict[int, Basic.Properties] = {}
        for index, message in enumerate(batch):
            if index in results:
                continue
            properties[index] = _properties(message, extra[index])
            refused = _header_frame_too_large(message, properties[index], frame_max)
            if refused is not None:
                results[index] = refused
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
                    properties=properties[index],
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

    def _extra_headers(self, message: Message) -> dict[str, str]:
        if self.cloudevents is None:
            return {}
        return self.cloudevents.amqp_headers(message)

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
            return too_large(len(message.body), limit, "RabbitMQ's max_message_size")
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
            refused = refusal(exc, self.address, self._url)
            if refused is not None:
                raise refused from None
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
        except aiormq.exceptions.ChannelAccessRefused as exc:
            self._stale = True
            raise BrokerRefusedError(
                f"RabbitMQ at {self.address} refused access to exchange {self.exchange!r} "
                f"({self._describe(exc)}); grant the user configure and write permissions on "
                "it (rabbitmqctl set_permissions) or use another user"
            ) from None
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
                    async with asyncio.timeout(self.connect_timeout):
                        await resource.close()

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


def _properties(message: Message, extra_headers: dict[str, str]) -> Basic.Properties:
    headers: dict[str, Any] = message.wire_headers()
    headers.update(extra_headers)
    return Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        message_id=str(message.id),
        timestamp=message.created_at,
        headers=headers,
    )


def describe_amqp_error(exc: BaseException, url: str) -> str:
    """``ExceptionType: text`` of a client error, with the URL's password and secret query
    values hidden (aiormq quotes what it was given)."""
    text = scrub(str(exc) or repr(exc), url)
    password = urlsplit(url).password
    if password:
        text = text.replace(password, "***")
    return f"{type(exc).__name__}: {text}"


def refusal(exc: BaseException, address: str, url: str) -> BrokerRefusedError | None:
    """The error to raise when connecting failed because RabbitMQ refused this client
    (login, unknown or forbidden vhost), or None for other failures (outages)."""
    parts = urlsplit(url)
    user = unquote(parts.username or "guest")
    untrusted = untrusted_certificate(exc)
    if untrusted is not None:
        return BrokerRefusedError(
            f"RabbitMQ at {address} presented a TLS certificate this client does not trust "
            f"({untrusted}); point POSTROOM_AMQP_CA_FILE (or cafile= in the broker URL) at "
            "the CA that signed RabbitMQ's certificate, and connect by a name it is issued for"
        )
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerRefusedError(
            f"RabbitMQ at {address} refused the login of user {user!r} (ACCESS_REFUSED); "
            "fix the user name and password in the broker URL (POSTROOM_BROKER_URL)"
        )
    # A refused vhost (unknown, or the user has no access) closes the connection in
    # answer to Connection.Open; aiormq reports only that the answer was not OpenOk.
    text = str(exc)
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
        isinstance(exc, aiormq.exceptions.InvalidFrameError)
        and "Connection.OpenOk" in text
        and "Connection.Close" in text
    ):
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return BrokerRefusedError(
            f"RabbitMQ at {address} would not open virtual host {vhost!r} for user {user!r} "
            "(it does not exist, or the user has no access to it); create it or grant "
            "access (rabbitmqctl add_vhost / set_permissions), or fix the vhost in the "
            "broker URL (POSTROOM_BROKER_URL)"
        )
    return None


def _header_frame_too_large(
    message: Message, properties: Basic.Properties, frame_max: int
) -> PublishResult | None:
    """A permanent rejection if the message's properties (with its headers) do not fit one
    AMQP frame: RabbitMQ closes the whole connection on a larger frame (frame_too_large)."""
    if frame_max <= 0:
        return None
    headers: dict[str, Any] = properties.headers or {}
    estimate = _PROPERTIES_ESTIMATE_OVERHEAD
    for name, value in headers.items():
        estimate += len(name) + len(str(value)) + _HEADER_ESTIMATE_OVERHEAD
    # str length is a lower bound of its UTF-8 length: measure exactly when it might not fit.
    if estimate * 4 <= frame_max:
        return None
    try:
        size = len(amqp_frame.marshal(ContentHeader(1, len(message.body), properties), 1))
    except Exception as exc:  # pamqp refuses values it cannot encode (e.g. a name > 255 bytes)
        return PublishResult(
            Outcome.REJECTED,
            f"RabbitMQ cannot carry the message's headers ({type(exc).__name__}: {exc}); "
            "shorten the header names (at most 255 bytes) and values",
            permanent=True,
        )
    if size <= frame_max:
        return None
    return too_large(
        size,
        frame_max,
        "RabbitMQ's frame_max (headers and properties must fit one frame)",
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
