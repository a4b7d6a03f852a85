"""Ticks and tick batches: how the new relay engine reads an append-only stream (issue 16).

A tick records ``pg_current_snapshot()`` and two values of the stream's position sequence.
A batch is every row visible in a later tick's snapshot and not in an earlier one's, read
in position order, one page and one lease partition at a time (docs/relay-engine-design.md
argues why no committed row is skipped or read twice). Not wired into the relay yet: the
tests create scratch tables with :func:`scratch_tables_sql`; the migration comes later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from postroom.errors import SnapshotWentBackError
from postroom.schema.sql import quote_identifier


@dataclass(frozen=True)
class StreamTables:
    """The names of one outbox's stream, its position sequence and its tick table."""

    schema: str | None
    outbox: str

    def _qualified(self, suffix: str) -> str:
        name = quote_identifier(f"{self.outbox}_{suffix}")
        return name if self.schema is None else f"{quote_identifier(self.schema)}.{name}"

    @property
    def stream(self) -> str:
        """The stream table, quoted."""
        return self._qualified("stream")

    @property
    def ticks(self) -> str:
        """The tick table, quoted."""
        return self._qualified("ticks")

    @property
    def sequence(self) -> str:
        """The position sequence, quoted (it must hand out positions with a cache of 1)."""
        return self._qualified("stream_position")


def scratch_tables_sql(tables: StreamTables) -> list[str]:
    """A stream (partitioned by xid, one partition for all) and its tick table, for tests."""
    literal = tables.sequence.replace("'", "''")
    return [
        f"CREATE SEQUENCE {tables.sequence} CACHE 1",
        f"CREATE TABLE {tables.stream} ("
        "xid xid8 NOT NULL, "
        f"position bigint NOT NULL DEFAULT nextval('{literal}'), "
        "partition smallint NOT NULL, id uuid NOT NULL, topic text NOT NULL, key text, "
        "payload bytea NOT NULL, headers jsonb NOT NULL DEFAULT '{}', "
        "created_at timestamptz NOT NULL DEFAULT now()) PARTITION BY RANGE (xid)",
        f"CREATE TABLE {tables._qualified('stream_all')} PARTITION OF {tables.stream} "
        "FOR VALUES FROM (MINVALUE) TO (MAXVALUE)",
        f"CREATE INDEX ON {tables.stream} (partition, position)",
        f"CREATE INDEX ON {tables.stream} (partition, xid)",
        f"CREATE TABLE {tables.ticks} (id bigint PRIMARY KEY, snapshot pg_snapshot NOT NULL, "
        "before_position bigint NOT NULL, last_position bigint NOT NULL, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    ]


def enqueue_sql(tables: StreamTables) -> str:
    """One INSERT of rows from parallel arrays: the materialized CTE takes the transaction's
    xid before the first row's position (the design's "xid first, then position")."""
    return (
        "WITH x AS MATERIALIZED (SELECT pg_current_xact_id() AS xid) "
        f"INSERT INTO {tables.stream} (xid, partition, id, topic, key, payload, headers) "
        "SELECT x.xid, r.partition, r.id, r.topic, r.key, r.payload, r.headers::jsonb "
        "FROM x, unnest(CAST(:partition AS smallint[]), CAST(:id AS uuid[]), "
        "CAST(:topic AS text[]), CAST(:key AS text[]), CAST(:payload AS bytea[]), "
        "CAST(:headers AS text[])) WITH ORDINALITY "
        "AS r(partition, id, topic, key, payload, headers, n) ORDER BY r.n"
    )


def position_sql(tables: StreamTables) -> str:
    """The last position the sequence handed out (0 before the first)."""
    return (
        f"SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {tables.sequence}"
    )


def last_tick_sql(tables: StreamTables) -> str:
    """``before_position``, then the latest tick's id and snapshot (NULLs before the first)."""
    return (
        f"SELECT ({position_sql(tables)}) AS before_position, t.id, t.snapshot::text "
        f"FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT id, snapshot FROM {tables.ticks} "
        "ORDER BY id DESC LIMIT 1) AS t ON true"
    )


def insert_tick_sql(tables: StreamTables) -> str:
    """The tick itself: the snapshot, and ``last_position`` read after it in one statement."""
    return (
        f"INSERT INTO {tables.ticks} (id, snapshot, before_position, last_position) "
        f"VALUES (:id, pg_current_snapshot(), :before, ({position_sql(tables)})) "
        "RETURNING id, snapshot::text, before_position, last_position"
    )


@dataclass(frozen=True)
class Tick:
    """One row of the tick table."""

    id: int
    snapshot: str
    before_position: int
    last_position: int


def snapshot_xmax(snapshot: str) -> int:
    """The ``xmax`` of a snapshot in its text form ``xmin:xmax:xip,...``."""
    return int(snapshot.split(":")[1])


async def take_tick(connection: AsyncConnection, tables: StreamTables) -> Tick:
    """Record one tick in its own short transaction (``connection`` must have none open).

    Under the tick table's lock: ``before_position`` in one statement, then the snapshot and
    ``last_position`` in the next, so tick ids follow snapshot order. A snapshot whose
    ``xmax`` is below the previous tick's raises :class:`SnapshotWentBackError`, unwritten.
    """
    async with connection.begin():
        # Each statement its own snapshot, whatever the engine's default: before_position
        # must be read before the tick's snapshot is taken.
        await connection.execute(text("SET TRANSACTION ISOLATION LEVEL READ COMMITTED"))
        # Safe: progress that names this tick commits later, and WAL is flushed in order.
        await connection.execute(text("SET LOCAL synchronous_commit = off"))
        await connection.execute(text(f"LOCK TABLE {tables.ticks} IN EXCLUSIVE MODE"))
        before, last_id, last_snapshot = (
            await connection.execute(text(last_tick_sql(tables)))
        ).one()
        row = (
            await connection.execute(
                text(insert_tick_sql(tables)), {"id": (last_id or 0) + 1, "before": before}
            )
        ).one()
        tick = Tick(int(row[0]), str(row[1]), int(row[2]), int(row[3]))
        was, now = snapshot_xmax(last_snapshot or "0:0:"), snapshot_xmax(tick.snapshot)
        if now < was:
            raise SnapshotWentBackError(
                f"the database's transaction ids went back: tick {last_id} saw xmax "
                f"{was}, now {now} (restored "
                "from a dump into another cluster?); no tick written. Stop the relays and run "
                "`postroom outbox rebase`."
            )
    return tick


@dataclass(frozen=True)
class Progress:
    """Where a lease partition stands: in the batch from ``tick``, after ``after_position``.

    ``end_tick`` is the end of the batch being read (None at a batch's start): a batch
    resumed mid-way must keep its end, since a later one also holds rows of lower positions.
    """

    tick: int
    after_position: int = 0
    end_tick: int | None = None


@dataclass(frozen=True)
class Batch:
    """The rows visible in tick ``end_tick``'s snapshot and not in tick ``start_tick``'s.

    ``from_position`` is ``before_position`` of the tick before ``start_tick`` (0 when it is
    gone), ``to_position`` the ``last_position`` of ``end_tick``.
    """

    start_tick: int
    end_tick: int
    from_position: int
    to_position: int
    start_snapshot: str
    end_snapshot: str


def choose_batch_sql(tables: StreamTables, *, resume: bool) -> str:
    """Tick N (``:tick``), N-1's ``before_position`` and the end tick M (NULL if none yet).

    M is ``:end_tick`` when resuming a batch, else the latest tick whose ``last_position``
    is at most ``:span`` past N's, and at least N+1.
    """
    which = (
        "t.id = :end_tick"
        if resume
        else "t.id > n.id AND (t.id = n.id + 1 OR t.last_position <= n.last_position + :span)"
    )
    return (
        "SELECT n.id, n.snapshot::text, coalesce(p.before_position, 0), "
        "m.id, m.snapshot::text, m.last_position "
        f"FROM {tables.ticks} AS n LEFT JOIN {tables.ticks} AS p ON p.id = n.id - 1 "
        "LEFT JOIN LATERAL (SELECT t.id, t.snapshot, t.last_position "
        f"FROM {tables.ticks} AS t WHERE {which} ORDER BY t.id DESC LIMIT 1) AS m ON true "
        "WHERE n.id = :tick"
    )


async def choose_batch(
    connection: AsyncConnection, tables: StreamTables, progress: Progress, span: int
) -> Batch | None:
    """The batch to read from ``progress`` (None until a tick after its tick exists)."""
    resume = progress.end_tick is not None
    row = (
        await connection.execute(
            text(choose_batch_sql(tables, resume=resume)),
            {"tick": progress.tick, "end_tick": progress.end_tick, "span": span},
        )
    ).one_or_none()
    if row is None or (resume and row[3] is None):
        raise LookupError(f"{progress} names a tick missing from {tables.ticks}")
    if row[3] is None:
        return None
    return Batch(int(row[0]), int(row[3]), int(row[2]), int(row[5]), str(row[1]), str(row[4]))


#: What a page returns of each row, position first.
ROW_COLUMNS = "r.position, r.xid::text, r.partition, r.id, r.topic, r.key, r.payload, r.headers"


def new_xids_part_sql(tables: StreamTables) -> str:
    """Part A: rows of xids not yet running at tick N, found by position."""
    return (
        f"SELECT {ROW_COLUMNS} FROM {tables.stream} AS r WHERE r.partition = :partition "
        "AND r.position > :above AND r.position <= :to_position "
        "AND r.xid >= CAST(:low_xid AS xid8) AND r.xid < CAST(:high_xid AS xid8) "
        "AND pg_visible_in_snapshot(r.xid, CAST(:end_snapshot AS pg_snapshot)) "
        "ORDER BY r.position LIMIT :limit"
    )


def running_xids_part_sql(tables: StreamTables) -> str:
    """Part B: rows of transactions running at tick N (its xip list), found by xid."""
    return (
        f"SELECT {ROW_COLUMNS} FROM {tables.stream} AS r WHERE r.partition = :partition "
        "AND r.xid = ANY(CAST(:running AS xid8[])) AND r.position > :after "
        "AND pg_visible_in_snapshot(r.xid, CAST(:end_snapshot AS pg_snapshot)) "
        "ORDER BY r.position LIMIT :limit"
    )


def page_sql(parts: Sequence[str]) -> str:
    """The parts, each limited, merged in position order and limited again."""
    union = " UNION ALL ".join(f"({part})" for part in parts)
    return f"SELECT * FROM ({union}) AS batch ORDER BY position LIMIT :limit"


def read_page_sql(tables: StreamTables) -> str:
    """One page of a batch for one lease partition: parts A and B."""
    return page_sql([new_xids_part_sql(tables), running_xids_part_sql(tables)])


def page_parameters(batch: Batch, partition: int, after: int, limit: int) -> dict[str, Any]:
    """The parameters of :func:`read_page_sql` (and of any page built from its parts)."""
    return {
        "partition": partition,
        "above": max(after, batch.from_position),
        "after": after,
        "to_position": batch.to_position,
        "low_xid": str(snapshot_xmax(batch.start_snapshot)),
        "high_xid": str(snapshot_xmax(batch.end_snapshot)),
        "running": [x for x in batch.start_snapshot.split(":")[2].split(",") if x],
        "end_snapshot": batch.end_snapshot,
        "limit": limit,
    }


def progress_after(batch: Batch, rows: Sequence[Sequence[Any]], limit: int) -> Progress:
    """Progress once ``rows`` (a page, position first) are published: a short page ends it."""
    if len(rows) < limit:
        return Progress(batch.end_tick)
    return Progress(batch.start_tick, int(rows[-1][0]), batch.end_tick)


async def read_page(
    connection: AsyncConnection,
    tables: StreamTables,
    batch: Batch,
    partition: int,
    after: int,
    limit: int,
) -> tuple[list[Sequence[Any]], Progress]:
    """One page of ``batch`` for ``partition`` past ``after`` (rows as ``ROW_COLUMNS``), and
    the progress once it is published."""
    result = await connection.execute(
        text(read_page_sql(tables)), page_parameters(batch, partition, after, limit)
    )
    rows: list[Sequence[Any]] = [tuple(row) for row in result]
    return rows, progress_after(batch, rows, limit)
