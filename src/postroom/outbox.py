"""The write side: enqueue messages into the caller's open transaction."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Unpack

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from postroom import tracing
from postroom.config import Settings
from postroom.correlation import follow_up_headers
from postroom.encoding import JsonDefault
from postroom.errors import (
    InvalidMessageError,
    NotInTransactionError,
    SchemaMissingError,
    UnsupportedTargetError,
)
from postroom.message import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_HEADERS,
    Message,
    MessageOptions,
    check_message,
    message_size,
    validate_headers,
)
from postroom.schema.sql import insert_outbox_sql
from postroom.schema.tables import Tables, build_tables, partition_for, tables_for

SyncTarget = Session | Connection | psycopg.Connection[Any]
AsyncTarget = AsyncSession | AsyncConnection | psycopg.AsyncConnection[Any]


class Outbox:
    """Writes messages into postroom's outbox table inside the caller's transaction.

    ``enqueue`` never begins or commits a transaction: the rows become visible to the
    relay exactly when the caller's transaction commits, and vanish if it rolls back.

    ``json_default`` encodes payload values of types postroom does not know (see
    :mod:`postroom.encoding`) for every message of this outbox; a ``json_default`` given
    to one ``enqueue`` call takes its place for that call.
    """

    def __init__(
        self,
        tables: Tables | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        notify: bool = True,
        json_default: JsonDefault | None = None,
    ) -> None:
        self.tables = tables or build_tables()
        self.max_payload_bytes = max_payload_bytes
        self.notify = notify
        self.json_default = json_default

    @classmethod
    def from_settings(
        cls, settings: Settings, *, json_default: JsonDefault | None = None
    ) -> Outbox:
        """An Outbox using the table names and limits of ``settings``."""
        return cls(
            tables_for(settings),
            max_payload_bytes=settings.max_payload_bytes,
            notify=settings.notify,
            json_default=json_default,
        )

    def message(self, topic: str, payload: Any, **options: Unpack[MessageOptions]) -> Message:
        """Build and validate a message under this outbox's payload limit (and with its
        ``json_default`` unless ``options`` give one)."""
        options.setdefault("json_default", self.json_default)
        return Message.create(topic, payload, max_payload_bytes=self.max_payload_bytes, **options)

    def enqueue(
        self, target: SyncTarget, topic: str, payload: Any, **options: Unpack[MessageOptions]
    ) -> Message:
        """Write one message into ``target``'s open transaction and return it.

        ``options`` are those of :meth:`Message.create`: ``key``, ``headers``, ``delay``,
        ``message_id``, ``content_type`` and ``json_default``. The message written (and
        returned) also carries the context headers of :meth:`enqueue_many`.
        """
        message = self.message(topic, payload, **options)
        return self.enqueue_many(target, [message])[0]

    def enqueue_many(self, target: SyncTarget, messages: Iterable[Message]) -> list[Message]:
        """Write a batch of messages into ``target``'s open transaction with one statement.

        Returns the messages as written: each with the context headers it did not set
        itself, when there are any: the W3C ``traceparent``/``tracestate`` of the active
        OpenTelemetry span (with the ``otel`` extra) and, inside a handler, the
        ``postroom-correlation-id``/``postroom-causation-id`` of the consumed message.
        """
        batch = self._checked(messages)
        if not batch:
            return batch
        params = self._params(batch)
        with _translated_errors():
            if isinstance(target, Session):
                _require_transaction(target.connection())
                target.execute(text(insert_outbox_sql(self.tables, "named", self.notify)), params)
            elif isinstance(target, Connection):
                _require_transaction(target)
                target.execute(text(insert_outbox_sql(self.tables, "named", self.notify)), params)
            elif isinstance(target, psycopg.Connection):
                _require_driver_transaction(target)
                target.execute(insert_outbox_sql(self.tables, "pyformat", self.notify), params)
            else:
                raise _unsupported(target, async_api=False)
        return batch

    async def enqueue_async(
        self, target: AsyncTarget, topic: str, payload: Any, **options: Unpack[MessageOptions]
    ) -> Message:
        """Write one message into ``target``'s open transaction (async) and return it."""
        message = self.message(topic, payload, **options)
        return (await self.enqueue_many_async(target, [message]))[0]

    async def enqueue_many_async(
        self, target: AsyncTarget, messages: Iterable[Message]
    ) -> list[Message]:
        """Write a batch of messages into ``target``'s open transaction with one statement
        (with context headers, as :meth:`enqueue_many`)."""
        batch = self._checked(messages)
        if not batch:
            return batch
        params = self._params(batch)
        with _translated_errors():
            if isinstance(target, AsyncSession):
                _require_transaction((await target.connection()).sync_connection)
                sql = text(insert_outbox_sql(self.tables, "named", self.notify))
                await target.execute(sql, params)
            elif isinstance(target, AsyncConnection):
                _require_transaction(target.sync_connection)
                sql = text(insert_outbox_sql(self.tables, "named", self.notify))
                await target.execute(sql, params)
            elif isinstance(target, psycopg.AsyncConnection):
                _require_driver_transaction(target)
                await target.execute(
                    insert_outbox_sql(self.tables, "pyformat", self.notify), params
                )
            else:
                raise _unsupported(target, async_api=True)
        return batch

    def _checked(self, messages: Iterable[Message]) -> list[Message]:
        batch = list(messages)
        for message in batch:
            if not isinstance(message, Message):
                raise InvalidMessageError(
                    f"enqueue_many takes Message objects, got {type(message).__name__}; "
                    "build them with outbox.message(...) or Message.create(...)"
                )
            check_message(message, self.max_payload_bytes)
        context = {**tracing.trace_headers(), **follow_up_headers()}
        if not context:
            return batch
        return [self._with_context(message, context) for message in batch]

    def _with_context(self, message: Message, context: Mapping[str, str]) -> Message:
        """``message`` with the ``context`` headers it does not set itself; unchanged when
        there are none to add, or they would not fit its limits (context is best effort:
        it never makes a valid message fail)."""
        own = {name.lower() for name in message.headers}
        added = {name: value for name, value in context.items() if name not in own}
        if not added:
            return message
        headers = {**message.headers, **added}
        if len(headers) > MAX_HEADERS:
            return message
        if message_size(message.body, headers) > self.max_payload_bytes:
            return message
        try:
            validate_headers(added)
        except InvalidMessageError:
            return message
        return dataclasses.replace(message, headers=headers)

    def _params(self, batch: Sequence[Message]) -> dict[str, Any]:
        return {
            "id": [m.id for m in batch],
            "topic": [m.topic for m in batch],
            "key": [m.key for m in batch],
            "partition": [partition_for(m.key, m.id) for m in batch],
            "payload": [m.body for m in batch],
            "content_type": [m.content_type for m in batch],
            "headers": [json.dumps(dict(m.headers)) for m in batch],
            "created_at": [m.created_at for m in batch],
            "available_at": [m.available_at for m in batch],
            "delay_seconds": [m.delay_seconds for m in batch],
            "channel": self.tables.notify_channel,
        }


def _require_transaction(connection: Connection | None) -> None:
    if connection is not None:
        _require_driver_transaction(connection.connection.driver_connection)


def _require_driver_transaction(driver_connection: object) -> None:
    """Refuse a connection that would commit the insert by itself (autocommit, no BEGIN)."""
    autocommit = getattr(driver_connection, "autocommit", False)
    info = getattr(driver_connection, "info", None)
    status = getattr(info, "transaction_status", None)
    if autocommit is True and status in (TransactionStatus.IDLE, None):
        raise NotInTransactionError(
            "the connection is in autocommit mode, so the outbox row would commit on its own, "
            "apart from your business writes; enqueue inside a transaction "
            "(for psycopg: `with conn.transaction():`; for SQLAlchemy: a Session, or "
            "`with engine.begin() as conn:` without AUTOCOMMIT isolation)"
        )


def _unsupported(target: object, *, async_api: bool) -> UnsupportedTargetError:
    if isinstance(target, Engine | AsyncEngine):
        hint = "pass the Session or Connection of your transaction, not the Engine"
    elif async_api:
        hint = (
            "enqueue_async takes an AsyncSession, AsyncConnection or psycopg.AsyncConnection; "
            "use enqueue() for sync ones"
        )
    else:
        hint = (
            "enqueue takes a Session, Connection or psycopg.Connection; "
            "use enqueue_async() for async ones"
        )
    return UnsupportedTargetError(f"cannot enqueue into a {type(target).__name__}: {hint}")


class _translated_errors:
    """Turn 'table does not exist' into SchemaMissingError naming the fix."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        original = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
        if isinstance(original, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            raise SchemaMissingError(
                f"postroom's tables are missing ({str(original).splitlines()[0]}); "
                "create them with `postroom db upgrade` (or your own migrations)"
            ) from exc
