"""One handler run in the transaction that records its message in the inbox.

The inbox row is written on the connection first and the handler's session joins that
transaction, so the handler's writes and the inbox row commit together or not at all. What
the database's failures mean for the message is decided here too: an outage costs no
attempt (:class:`DatabaseUnavailable`), an id the inbox cannot store is a dead letter, and
a transaction the handler let PostgreSQL abort fails the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

from postroom.consumer.decoding import describe_error
from postroom.errors import AbortedTransactionError, UndecodableMessageError

if TYPE_CHECKING:
    from postroom.consumer.registry import HandlerSpec


class DatabaseUnavailable(Exception):
    """The database could not be reached; no attempt is counted."""


#: How a handler's session joins the transaction that holds its inbox row, at first: no
#: savepoint (it would cost a round trip and SQLAlchemy's nested-transaction machinery per
#: message); ``commit()`` only flushes, ``rollback()`` ends the whole transaction.
JOINED_WITHOUT_SAVEPOINT: Final[dict[str, Any]] = {
    "expire_on_commit": False,
    "join_transaction_mode": "rollback_only",
}
#: How it joins when run again after it rolled back its session: under a savepoint, so
#: that its rollback undoes its own work only and the inbox row stays.
JOINED_WITH_SAVEPOINT: Final[dict[str, Any]] = {
    "expire_on_commit": False,
    "join_transaction_mode": "create_savepoint",
}


ROLLED_BACK: Final = (
    "the handler rolled back the transaction that holds the message's inbox row; use "
    "session.begin_nested() for work it may undo"
)


class SessionRolledBack(Exception):
    """The handler rolled back its session, and with it the inbox row: run it again with
    a savepoint (see :meth:`HandlerTransactions.run`)."""


#: SQLSTATEs of a server that is shutting down or restarting (besides class 08, connection).
_SERVER_GONE = frozenset({"57P01", "57P02", "57P03"})


def connection_failed(exc: BaseException) -> bool:
    """True if ``exc`` means the database could not be reached or dropped the connection.

    Only such failures leave a message's attempts alone: an invalidated connection, SQLSTATE
    class 08, 57P01-57P03, or a psycopg OperationalError without a SQLSTATE (no server
    answer). Errors of the handler's SQL (statement or lock timeout, deadlock,
    serialization failure, ...) are failures of the attempt like any other.
    """
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate.startswith("08") or sqlstate in _SERVER_GONE


ABORTED: Final = (
    "the handler returned normally, but PostgreSQL had aborted its transaction (it caught a "
    "database error and carried on): nothing of this attempt is committed; let the error "
    "propagate, or run the statement that may fail in session.begin_nested()"
)


def transaction_aborted(driver_connection: Any) -> bool:
    """True if PostgreSQL aborted the transaction of ``driver_connection`` (a psycopg
    connection): an error was caught and swallowed, and a COMMIT would silently roll back.
    Read from the connection's state, without a round trip."""
    status = driver_connection.info.transaction_status
    return bool(status == psycopg.pq.TransactionStatus.INERROR)


async def raise_if_aborted(connection: Any) -> None:
    """Raise :class:`AbortedTransactionError` if ``connection``'s (an SQLAlchemy
    ``AsyncConnection``) transaction was aborted by an error a handler swallowed."""
    raw = await connection.get_raw_connection()
    if transaction_aborted(raw.driver_connection):
        raise AbortedTransactionError(ABORTED)


def _is_bad_value(exc: sa_exc.DBAPIError) -> bool:
    return isinstance(exc, sa_exc.DataError) or isinstance(exc.orig, psycopg.DataError)


@contextlib.contextmanager
def inbox_errors() -> Iterator[None]:
    """Turn a failed inbox insert into a dead letter (a bad id) or an outage."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        if _is_bad_value(exc) and not connection_failed(exc):
            # The id cannot be stored (e.g. a NUL character from a foreign producer).
            raise UndecodableMessageError(
                f"the message id cannot be stored in the inbox "
                f"({describe_error(exc.orig or exc)}); it is dead-lettered: fix the producer"
            ) from exc
        # Not the message's fault (database down, tables missing): no attempt is spent.
        raise DatabaseUnavailable(describe_error(exc.orig or exc)) from exc


@dataclass(frozen=True, slots=True)
class _Call:
    """A handler's run: the handler, its argument, the inbox row's parameters and the
    statement to run beside it (or None)."""

    spec: HandlerSpec
    argument: Any
    params: dict[str, str]
    forget: Any


class HandlerTransactions:
    """Runs handlers, ``async def`` ones on the event loop and ``def`` ones in a worker
    thread, each in the transaction that inserts its message's inbox row (``insert``)."""

    def __init__(
        self, insert: TextClause, async_engine: AsyncEngine, sync_engine: Callable[[], Engine]
    ) -> None:
        self.insert = insert
        self._async_engine = async_engine
        self._sync_engine = sync_engine

    async def run(
        self, spec: HandlerSpec, argument: Any, params: dict[str, str], forget: Any
    ) -> bool:
        """Insert the inbox row (``params``: consumer and message_id), run the handler with
        ``argument``, commit; False, with nothing run, if the inbox already held the row.
        ``forget``: a statement to run with ``params`` in the same transaction, or None.

        The handler's session joins the transaction without a savepoint. If it rolls the
        session back (which then rolls back the inbox row too) and returns, that run is
        undone and the handler runs once more, under a savepoint: its rollback then undoes
        only its own work, and what it writes after it commits with the inbox row.
        """
        call = _Call(spec, argument, params, forget)
        try:
            return await self._run(call, savepoint=False)
        except SessionRolledBack:
            return await self._run(call, savepoint=True)

    async def _run(self, call: _Call, *, savepoint: bool) -> bool:
        if call.spec.is_async:
            return await self._run_async(call, savepoint)
        return await asyncio.to_thread(self._run_sync, call, savepoint)

    async def _run_async(self, call: _Call, savepoint: bool) -> bool:
        joined = JOINED_WITH_SAVEPOINT if savepoint else JOINED_WITHOUT_SAVEPOINT
        async with self._async_engine.connect() as connection:
            transaction = await connection.begin()
            try:
                with inbox_errors():
                    inserted = (await connection.execute(self.insert, call.params)).first()
                if inserted is None:
                    await connection.rollback()
                    return False
                if call.forget is not None:
                    await connection.execute(call.forget, call.params)
                async with AsyncSession(bind=connection, **joined) as session:
                    await call.spec.function(call.argument, session)
                    await session.flush()
                    if not transaction.is_active:
                        raise SessionRolledBack(ROLLED_BACK)
                    await raise_if_aborted(connection)
                    # Committed while the session is open: a savepoint goes with the
                    # transaction (no RELEASE round trip; closing it after rolls nothing back).
                    await connection.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.rollback()
                raise
            return True

    def _run_sync(self, call: _Call, savepoint: bool) -> bool:
        joined = JOINED_WITH_SAVEPOINT if savepoint else JOINED_WITHOUT_SAVEPOINT
        with self._sync_engine().connect() as connection:
            transaction = connection.begin()
            try:
                with inbox_errors():
                    inserted = connection.execute(self.insert, call.params).first()
                if inserted is None:
                    connection.rollback()
                    return False
                if call.forget is not None:
                    connection.execute(call.forget, call.params)
                with Session(bind=connection, **joined) as session:
                    call.spec.function(call.argument, session)
                    session.flush()
                    if not transaction.is_active:
                        raise SessionRolledBack(ROLLED_BACK)
                    if transaction_aborted(connection.connection.driver_connection):
                        raise AbortedTransactionError(ABORTED)
                    connection.commit()  # as in _run_async
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.rollback()
                raise
            return True
