"""The relay's side of the outbox table: claim batches, record outcomes, purge, count."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from postroom.brokers.base import Outcome
from postroom.database import translate
from postroom.errors import DatabaseError
from postroom.message import Message
from postroom.schema import relay_sql
from postroom.schema.tables import Tables

#: Outcome names the mark statement understands: the broker's, plus "held" (not sent).
CONFIRMED: Final = Outcome.CONFIRMED.value
REJECTED: Final = Outcome.REJECTED.value
UNAVAILABLE: Final = Outcome.UNAVAILABLE.value
HELD: Final = "held"


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """One claimed outbox row and the message it holds."""

    position: int
    partition: int
    attempts: int
    message: Message
    due_at: datetime
    """The row's next_attempt_at as read; a mark applies only while it is unchanged."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A batch of rows in write order, with the lease tokens of their partitions."""

    rows: list[ClaimedRow]
    tokens: dict[int, uuid.UUID]
    """Partition → token of this relay's lease on it when the rows were read."""


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What to record for one claimed row, under its partition's lease token."""

    position: int
    token: uuid.UUID
    attempts: int
    """Attempts as read by the claim: a mark applied twice (a retry) changes nothing."""
    due_at: datetime
    """next_attempt_at as read by the claim: an operator's retry or replay moves it."""
    outcome: str
    error: str | None = None
    delay_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class MarkedRow:
    """A row the mark changed, with its new status and attempt count."""

    position: int
    status: str
    attempts: int


class Connection:
    """One autocommit psycopg connection that reconnects on the next use after a failure."""

    def __init__(self, conninfo: str, database_url: str) -> None:
        self._conninfo = conninfo
        self._database_url = database_url
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._closed = False

    async def get(self) -> psycopg.AsyncConnection[Any]:
        """The open connection, connecting first if needed (never after :meth:`close`)."""
        if self._closed:
            raise DatabaseError("the relay's database connection was closed (shutting down)")
        if self._connection is None or self._connection.closed:
            try:
                self._connection = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=10
                )
            except psycopg.Error as exc:
                raise self._error(exc) from exc
        return self._connection

    def _error(self, exc: psycopg.Error) -> Exception:
        """Every driver error as a postroom error, so callers back off instead of dying."""
        return translate(exc, self._database_url, always=True)

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows; errors become postroom errors."""
        connection = await self.get()
        try:
            cursor = await connection.execute(sql, params)
            return await cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            await self._drop_if_broken()
            raise self._error(exc) from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction on the connection; errors become postroom errors."""
        connection = await self.get()
        try:
            async with connection.transaction():
                yield connection
        except psycopg.Error as exc:
            await self._drop_if_broken()
            raise self._error(exc) from exc

    async def _drop_if_broken(self) -> None:
        connection = self._connection
        if connection is not None and connection.broken:
            self._connection = None
            await connection.close()

    async def close(self) -> None:
        """Close the connection for good: later uses raise instead of reconnecting."""
        self._closed = True
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


class OutboxStore:
    """Claims, marks and maintenance statements on one dedicated connection."""

    def __init__(self, connection: Connection, tables: Tables) -> None:
        self._connection = connection
        self._tables = tables

    async def claim(
        self, tokens: dict[int, uuid.UUID], *, limit: int, in_flight: Sequence[int] = ()
    ) -> Claim:
        """Read up to ``limit`` due rows of the partitions in ``tokens``, oldest first.

        ``in_flight`` lists positions of batches whose outcomes are not recorded yet.
        """
        rows = await self._connection.fetch(
            relay_sql.claim_sql(self._tables),
            {"partitions": sorted(tokens), "limit": limit, "in_flight": list(in_flight)},
        )
        partitions = {row[10] for row in rows}
        claimed = [
            ClaimedRow(
                position=row[0],
                partition=row[10],
                attempts=row[9],
                due_at=row[11],
                message=Message(
                    id=row[1],
                    topic=row[2],
                    key=row[3],
                    body=row[4],
                    content_type=row[5],
                    headers=row[6],
                    created_at=row[7],
                    available_at=row[8],
                ),
            )
            for row in rows
        ]
        return Claim(rows=claimed, tokens={p: tokens[p] for p in partitions})

    async def mark(
        self, outcomes: Sequence[RowOutcome], *, max_attempts: int, delete_published: bool
    ) -> list[MarkedRow]:
        """Record outcomes where the partition's lease token still holds; return those rows."""
        if not outcomes:
            return []
        rows = await self._connection.fetch(
            relay_sql.mark_sql(self._tables, delete_published),
            {
                "tokens": [o.token for o in outcomes],
                "positions": [o.position for o in outcomes],
                "attempts": [o.attempts for o in outcomes],
                "due": [o.due_at for o in outcomes],
                "outcomes": [o.outcome for o in outcomes],
                "errors": [o.error for o in outcomes],
                "delays": [o.delay_seconds for o in outcomes],
                "max_attempts": max_attempts,
            },
        )
        return [MarkedRow(position=r[0], status=r[1], attempts=r[2]) for r in rows]

    async def purge_published(self, older_than: float, *, limit: int) -> int:
        """Delete up to ``limit`` rows published more than ``older_than`` seconds ago."""
        rows = await self._connection.fetch(
            relay_sql.purge_published_sql(self._tables),
            {"older_than": older_than, "limit": limit},
        )
        return len(rows)

    async def backlog(self) -> tuple[int, float, int]:
        """Pending rows, age in seconds of the oldest pending row, dead-lettered rows."""
        rows = await self._connection.fetch(relay_sql.backlog_sql(self._tables), {})
        pending, oldest, dead = rows[0]
        return int(pending), float(oldest), int(dead)
