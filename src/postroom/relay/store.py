"""The relay's side of the outbox table: claim batches, record outcomes, purge, count."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple

import psycopg

from postroom.brokers.base import Outcome
from postroom.database import translate
from postroom.errors import DatabaseError
from postroom.message import Message
from postroom.schema import relay_sql
from postroom.schema.sql import quoted_table
from postroom.schema.tables import Tables

#: Outcome names the mark statement understands: the broker's, plus "held" (not sent) and
#: "refused" (rejected for good).
CONFIRMED: Final = Outcome.CONFIRMED.value
REJECTED: Final = Outcome.REJECTED.value
UNAVAILABLE: Final = Outcome.UNAVAILABLE.value
HELD: Final = "held"
#: Bytes (payloads and headers) a claim stops at unless told otherwise.
DEFAULT_CLAIM_BYTES: Final = 8 * 1024 * 1024
#: A rejection that can never succeed (e.g. too large for the broker): dead at once.
REFUSED: Final = "refused"


class ClaimedRow(NamedTuple):
    """One claimed outbox row and the message it holds.

    Tuples rather than dataclasses: a relay builds hundreds of thousands of these a
    minute, and a tuple is several times cheaper to make than a frozen dataclass.
    """

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
    claimed_at: float = 0.0
    """Wall-clock time (``time.time()``) at which the claim's rows came back."""


class RowOutcome(NamedTuple):
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


@dataclass(slots=True)
class BatchOutcomes:
    """The outcomes of a batch column by column, as the mark statement takes them."""

    positions: list[int]
    attempts: list[int]
    """Attempts as read by the claim, per row."""
    due: list[datetime]
    """next_attempt_at as read by the claim, per row."""
    outcomes: list[str]
    token_numbers: list[int]
    """Per row, the 1-based index in ``tokens`` of its partition's lease token."""
    tokens: list[uuid.UUID]
    failures: dict[int, tuple[str | None, float]] = field(default_factory=dict)
    """Position → (error, backoff delay in seconds), only for rows that have either."""

    @classmethod
    def of(cls, outcomes: Sequence[RowOutcome]) -> BatchOutcomes:
        """The same outcomes, given one row at a time."""
        numbers: dict[uuid.UUID, int] = {}
        return cls(
            positions=[o.position for o in outcomes],
            attempts=[o.attempts for o in outcomes],
            due=[o.due_at for o in outcomes],
            outcomes=[o.outcome for o in outcomes],
            token_numbers=[numbers.setdefault(o.token, len(numbers) + 1) for o in outcomes],
            tokens=list(numbers),
            failures={
                o.position: (o.error, o.delay_seconds)
                for o in outcomes
                if o.error is not None or o.delay_seconds
            },
        )


class MarkedRow(NamedTuple):
    """A row the mark changed, with its new status and attempt count."""

    position: int
    status: str
    attempts: int


def array_literal(values: Iterable[object]) -> str:
    """A PostgreSQL array literal, ``{1,2,3}``, of values whose text needs no quoting.

    Only for numbers, ISO timestamps and simple names: cast it in SQL (``::bigint[]``).
    """
    return "{" + ",".join(map(str, values)) + "}"


class Connection:
    """One autocommit psycopg connection that reconnects on the next use after a failure.

    ``session`` holds PostgreSQL settings applied to every new connection (``SET``).
    """

    def __init__(
        self, conninfo: str, database_url: str, *, session: dict[str, str] | None = None
    ) -> None:
        self._conninfo = conninfo
        self._database_url = database_url
        self._session = dict(session or {})
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._closed = False

    async def get(self) -> psycopg.AsyncConnection[Any]:
        """The open connection, connecting first if needed (never after :meth:`close`)."""
        if self._closed:
            raise DatabaseError("the relay's database connection was closed (shutting down)")
        if self._connection is None or self._connection.closed:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=10
                )
            except psycopg.Error as exc:
                raise self._error(exc) from exc
            try:
                for name, value in self._session.items():
                    await connection.execute("SELECT set_config(%s, %s, false)", (name, value))
            except psycopg.Error as exc:
                await connection.close()
                raise self._error(exc) from exc
            self._connection = connection
        return self._connection

    def _error(self, exc: psycopg.Error) -> Exception:
        """Every driver error as a postroom error, so callers back off instead of dying."""
        return translate(exc, self._database_url, always=True)

    async def fetch(
        self, sql: str, params: dict[str, Any], *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows (in binary format if ``binary``: cheaper to
        read ``bytea``); errors become postroom errors."""
        connection = await self.get()
        try:
            cursor = await connection.execute(sql, params, binary=binary)
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
        self,
        tokens: dict[int, uuid.UUID],
        *,
        limit: int,
        in_flight: Sequence[int] = (),
        max_bytes: int = DEFAULT_CLAIM_BYTES,
    ) -> Claim:
        """Read up to ``limit`` due rows of the partitions in ``tokens``, oldest first,
        stopping once their payloads and headers pass ``max_bytes`` (at least one row).

        ``in_flight`` lists positions of batches whose outcomes are not recorded yet.
        """
        rows = await self._connection.fetch(
            relay_sql.claim_sql(self._tables),
            {
                "partitions": sorted(tokens),
                "limit": limit,
                "max_bytes": max_bytes,
                "in_flight": array_literal(in_flight),
            },
            binary=True,
        )
        claimed_at = time.time()
        loads = json.loads
        claimed = [
            ClaimedRow(
                position,
                partition,
                attempts,
                Message(
                    id=id_,
                    topic=topic,
                    key=key,
                    body=body,
                    content_type=content_type,
                    headers=loads(headers) if headers is not None else {},
                    created_at=created_at,
                    available_at=available_at,
                ),
                due_at,
            )
            for (
                position,
                id_,
                topic,
                key,
                body,
                content_type,
                headers,
                created_at,
                available_at,
                attempts,
                partition,
                due_at,
            ) in rows
        ]
        partitions = {row.partition for row in claimed}
        return Claim(claimed, {p: tokens[p] for p in partitions}, claimed_at)

    async def mark(
        self, batch: BatchOutcomes, *, max_attempts: int, delete_published: bool
    ) -> list[MarkedRow]:
        """Record outcomes where the partition's lease token still holds; return those rows.

        ``BatchOutcomes.of`` builds ``batch`` from one :class:`RowOutcome` per row.
        """
        if not batch.positions:
            return []
        # The per-row arrays go as text literals built by str.join (they hold only numbers,
        # ISO timestamps and outcome names, none of which need quoting): adapting each
        # element through the driver costs more than the rest of the mark. Tokens (one per
        # partition) and errors (only rows that have one) are short lists sent as usual.
        failures = batch.failures
        rows = await self._connection.fetch(
            relay_sql.mark_sql(self._tables, delete_published),
            {
                "positions": array_literal(batch.positions),
                "attempts": array_literal(batch.attempts),
                "due": array_literal([due.isoformat() for due in batch.due]),
                "outcomes": array_literal(batch.outcomes),
                "token_numbers": array_literal(batch.token_numbers),
                "tokens": batch.tokens,
                "failed": list(failures),
                "errors": [error for error, _ in failures.values()],
                "delays": [delay for _, delay in failures.values()],
                "max_attempts": max_attempts,
            },
        )
        return [MarkedRow._make(r) for r in rows]

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

    async def hygiene(self) -> tuple[int, float]:
        """Dead tuples of the outbox table, and seconds the oldest transaction holding back
        vacuum in this database has been open."""
        outbox = quoted_table(self._tables.outbox)
        rows = await self._connection.fetch(relay_sql.hygiene_sql(), {"outbox": outbox})
        dead_tuples, oldest = rows[0]
        return int(dead_tuples), max(0.0, float(oldest))
