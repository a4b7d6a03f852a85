"""postroom: a transactional outbox and inbox for PostgreSQL, RabbitMQ and Kafka.

Write messages in the same transaction as your data with :func:`enqueue`; the relay
publishes them once the transaction commits, and only marks them sent when the broker
confirms.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Unpack

from postroom.config import Settings
from postroom.consumer import Consumer
from postroom.encoding import JsonDefault
from postroom.errors import (
    ConfigurationError,
    InvalidMessageError,
    NotInTransactionError,
    PayloadTooLargeError,
    PostroomError,
    SchemaMissingError,
    UnsupportedTargetError,
)
from postroom.message import Message, MessageOptions
from postroom.outbox import AsyncTarget, Outbox, SyncTarget

__all__ = [
    "ConfigurationError",
    "Consumer",
    "InvalidMessageError",
    "JsonDefault",
    "Message",
    "NotInTransactionError",
    "Outbox",
    "PayloadTooLargeError",
    "PostroomError",
    "SchemaMissingError",
    "Settings",
    "UnsupportedTargetError",
    "default_outbox",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
]


@functools.cache
def default_outbox() -> Outbox:
    """The Outbox used by the module-level functions, configured from ``POSTROOM_*``."""
    return Outbox.from_settings(Settings.from_env())


def enqueue(
    target: SyncTarget, topic: str, payload: Any, **options: Unpack[MessageOptions]
) -> Message:
    """Write a message into the open transaction of a Session, Connection or psycopg connection.

    ``options``: ``key`` (ordering key), ``headers`` (str to str), ``delay`` (timedelta or
    seconds), ``message_id`` (a UUID; a UUIDv7 is generated otherwise), ``content_type``
    (for bytes payloads), ``json_default`` (encodes payload values of types postroom does
    not know; :mod:`postroom.encoding` lists those it does: ``Decimal``, ``datetime``,
    ``date``, ``time``, ``UUID``, ``Enum``, dataclasses, pydantic models).

    It is published after that transaction commits and never if it rolls back. Messages
    with the same ``key`` are published in the order they were written.
    """
    return default_outbox().enqueue(target, topic, payload, **options)


def enqueue_many(target: SyncTarget, messages: Iterable[Message]) -> list[Message]:
    """Write a batch of messages (from :meth:`Message.create`) in one statement."""
    return default_outbox().enqueue_many(target, messages)


async def enqueue_async(
    target: AsyncTarget, topic: str, payload: Any, **options: Unpack[MessageOptions]
) -> Message:
    """Like :func:`enqueue`, for an AsyncSession, AsyncConnection or psycopg AsyncConnection."""
    return await default_outbox().enqueue_async(target, topic, payload, **options)


async def enqueue_many_async(target: AsyncTarget, messages: Iterable[Message]) -> list[Message]:
    """Like :func:`enqueue_many`, for async sessions and connections."""
    return await default_outbox().enqueue_many_async(target, messages)
