"""What a consumer needs on RabbitMQ, declared in one place.

The subscriber declares it when it starts; ``postroom broker setup`` declares it ahead of
time. Both go through :func:`consumer_topology` and :func:`declare`, so both declare the
same objects with the same arguments: the durable topic exchange, the consumer's durable
queue bound to it for every topic, its retry queues (which dead-letter back to the queue)
and its dead-letter queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq

from postroom.brokers.base import BOUND, CREATED, EXISTS, WOULD_BIND, WOULD_CREATE, SetupStep
from postroom.brokers.rabbitmq.publisher import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EXCHANGE,
    _address,
    describe_amqp_error,
    refusal,
)
from postroom.brokers.rabbitmq.tls import connection_url
from postroom.errors import BrokerRefusedError, BrokerUnavailableError, ConfigurationError

#: A retry queue nobody declared for this long is deleted by RabbitMQ (``x-expires``),
#: unless its tier's delay is longer (then four times the delay).
RETRY_QUEUE_EXPIRES_MS = 24 * 60 * 60 * 1000


def retry_tier_ms(delay: float) -> int:
    """The power-of-two number of milliseconds (at least 16) that holds ``delay``."""
    ms = max(1, round(delay * 1000))
    return max(16, 1 << (ms - 1).bit_length())


def retry_queue_name(queue: str, delay: float) -> str:
    """The retry queue for ``delay``: ``<queue>.retry.<ms>ms``, ms a power of two (>= 16).

    A message waits in it for its own delay (per-message expiration, capped by the queue's
    TTL), then RabbitMQ dead-letters it back to ``queue``. Delays in one queue differ by at
    most half, so one waiting at the head never holds another back by more than that.
    """
    return tier_queue_name(queue, retry_tier_ms(delay))


def tier_queue_name(queue: str, tier_ms: int) -> str:
    """The retry queue of ``queue`` for the tier of ``tier_ms``: ``<queue>.retry.<ms>ms``."""
    return f"{queue}.retry.{tier_ms}ms"


def retry_queue_expires_ms(tier_ms: int) -> int:
    """``x-expires`` of the retry queue of ``tier_ms``: far above any message's wait in it."""
    return max(RETRY_QUEUE_EXPIRES_MS, 4 * tier_ms)


def retry_queue_arguments(queue: str, tier_ms: int) -> dict[str, Any]:
    """The arguments of ``queue``'s retry queue for ``tier_ms``."""
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-message-ttl": tier_ms,
        "x-expires": retry_queue_expires_ms(tier_ms),
    }


def retry_tiers(shortest: float, longest: float) -> list[int]:
    """Every retry tier (ms) a delay between ``shortest`` and ``longest`` seconds can use."""
    if longest <= 0:
        return []
    tier, last = retry_tier_ms(max(shortest, 0.001)), retry_tier_ms(longest)
    tiers = []
    while tier <= last:
        tiers.append(tier)
        tier *= 2
    return tiers


@dataclass(frozen=True)
class Exchange:
    """A durable topic exchange."""

    name: str

    def describe(self) -> str:
        """``exchange NAME``, for output."""
        return f"exchange {self.name}"


@dataclass(frozen=True)
class Queue:
    """A durable queue with its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``queue NAME``, for output."""
        return f"queue {self.name}"


@dataclass(frozen=True)
class Binding:
    """``queue`` bound to ``exchange`` with ``routing_key``."""

    exchange: str
    queue: str
    routing_key: str

    def describe(self) -> str:
        """``binding EXCHANGE -> QUEUE (ROUTING KEY)``, for output."""
        return f"binding {self.exchange} -> {self.queue} ({self.routing_key})"


Declaration = Exchange | Queue | Binding


def consumer_topology(
    consumer: str,
    topics: Sequence[str],
    *,
    exchange: str = DEFAULT_EXCHANGE,
    tiers: Sequence[int] = (),
) -> list[Declaration]:
    """What ``consumer`` needs, in the order to declare it: the exchange, its queue, one
    binding per topic, the retry queues of ``tiers`` (ms) and the dead-letter queue."""
    from postroom.brokers.base import dead_letter_name

    declarations: list[Declaration] = [Exchange(exchange), Queue(consumer)]
    declarations += [Binding(exchange, consumer, topic) for topic in topics]
    declarations += [
        Queue(tier_queue_name(consumer, tier), retry_queue_arguments(consumer, tier))
        for tier in tiers
    ]
    declarations.append(Queue(dead_letter_name(consumer)))
    return declarations


async def declare(
    channel: Any, declaration: Declaration, declared: dict[tuple[str, str], Any] | None = None
) -> Any:
    """Declare ``declaration`` on ``channel``; the aio-pika exchange or queue (None for a
    binding). Declaring what exists with the same arguments changes nothing.

    ``declared`` collects the exchanges and queues by ``(kind, name)``; a binding binds the
    queue object found there (so a robust channel restores the binding on reconnect).
    """
    found = {} if declared is None else declared
    if isinstance(declaration, Exchange):
        exchange = await channel.declare_exchange(
            declaration.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        found["exchange", declaration.name] = exchange
        return exchange
    if isinstance(declaration, Queue):
        queue = await channel.declare_queue(
            declaration.name, durable=True, arguments=declaration.arguments or None
        )
        found["queue", declaration.name] = queue
        return queue
    queue = found.get(("queue", declaration.queue))
    if queue is None:
        queue = await channel.get_queue(declaration.queue, ensure=False)
    exchange = found.get(("exchange", declaration.exchange), declaration.exchange)
    await queue.bind(exchange, routing_key=declaration.routing_key)
    return None


async def exists(connection: Any, declaration: Exchange | Queue) -> bool:
    """Whether the exchange or queue exists (a passive declare, on a channel of its own:
    RabbitMQ closes the channel that asked for something missing)."""
    channel = await connection.channel()
    try:
        if isinstance(declaration, Exchange):
            await channel.declare_exchange(declaration.name, passive=True)
        else:
            await channel.declare_queue(declaration.name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()
    return True


async def declare_retry_queue(connection: Any, queue: Queue) -> bool:
    """Declare a retry queue on a channel of its own; False if one of that name exists
    with other arguments (then it is left as it is).

    A queue of the same name declared by an older postroom without ``x-expires`` makes
    RabbitMQ refuse the declaration (PRECONDITION_FAILED) and close that channel. The
    existing queue is used as it is: deleting it could drop messages waiting in it.
    """
    channel = await connection.channel()
    try:
        await declare(channel, queue)
    except aiormq.exceptions.ChannelPreconditionFailed:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


def retry_queue_advice(name: str) -> str:
    """What to do about retry queue ``name`` that exists without ``x-expires``."""
    return (
        f"retry queue {name!r} was declared by an older postroom without x-expires and is "
        f"used as it is; delete it once it is empty (rabbitmqctl delete_queue {name} "
        "--if-empty) and postroom declares it again with x-expires"
    )


async def set_up(
    url: str,
    declarations: Sequence[Declaration],
    *,
    dry_run: bool = False,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> list[SetupStep]:
    """Declare ``declarations`` at ``url`` (or, in a dry run, only look which exist): one
    step per object. Raises BrokerUnavailableError (BrokerRefusedError for a refused login,
    virtual host or permission) and ConfigurationError for an object that exists with other
    properties than postroom declares."""
    address = _address(urlsplit(url))
    try:
        connection = await aio_pika.connect(
            connection_url(url),
            timeout=connect_timeout,
            client_properties={"connection_name": "postroom broker setup"},
        )
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
        refused = refusal(exc, address, url)
        if refused is not None:
            raise refused from None
        raise BrokerUnavailableError(
            f"cannot reach RabbitMQ at {address}: {describe_amqp_error(exc, url)}; check that "
            "RabbitMQ is running and the broker URL (POSTROOM_BROKER_URL) is right"
        ) from None
    try:
        return await _set_up(connection, declarations, dry_run=dry_run)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise BrokerRefusedError(
            f"RabbitMQ at {address} refused access ({describe_amqp_error(exc, url)}); grant "
            "the user configure, write and read permissions on the exchange and the "
            "consumer's queues"
        ) from None
    except (aiormq.exceptions.ConnectionClosed, OSError, TimeoutError) as exc:
        raise BrokerUnavailableError(
            f"RabbitMQ at {address} closed the connection during set-up "
            f"({describe_amqp_error(exc, url)}); run the command again"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(connect_timeout):
                await connection.close()


async def _set_up(
    connection: Any, declarations: Sequence[Declaration], *, dry_run: bool
) -> list[SetupStep]:
    steps: list[SetupStep] = []
    present: dict[str, bool] = {}
    declared: dict[tuple[str, str], Any] = {}
    channel = None if dry_run else await connection.channel()
    for item in declarations:
        if isinstance(item, Binding):
            queue_existed = present.get(item.queue, False)
            if dry_run:
                steps.append(
                    SetupStep(item.describe(), WOULD_BIND if queue_existed else WOULD_CREATE)
                )
                continue
            await declare(channel, item, declared)
            steps.append(SetupStep(item.describe(), BOUND if queue_existed else CREATED))
            continue
        existed = present[item.name] = await exists(connection, item)
        if dry_run:
            steps.append(SetupStep(item.describe(), EXISTS if existed else WOULD_CREATE))
            continue
        warning = None
        if isinstance(item, Queue) and item.arguments.get("x-dead-letter-routing-key"):
            if not await declare_retry_queue(connection, item):
                warning = retry_queue_advice(item.name)
        else:
            try:
                await declare(channel, item, declared)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ConfigurationError(
                    f"{item.describe()} exists with other properties than postroom declares "
                    f"({exc}); delete it once it is empty, or use another name, and run "
                    "postroom broker setup again"
                ) from None
        steps.append(SetupStep(item.describe(), EXISTS if existed else CREATED, warning))
    return steps
