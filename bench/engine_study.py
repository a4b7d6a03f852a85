"""Engine study: ways for a relay to read an append-only outbox without per-row writes.

Each candidate gets a fresh outbox in a scratch schema (``engine_study_<random>``,
dropped afterwards), a committed backlog, and then the same traffic while one reader
thread (one relay owning ``--slots`` lease partitions) reads it in pages:

- ``a`` keyset read by position, cursor kept in memory, nothing written: the ceiling.
  It is not safe: a row whose transaction commits after a later position was read is
  skipped (its correctness check is expected to fail, which shows the check can fail).
- ``b`` today's shape: read a page of pending rows, UPDATE each row to ``published``; an
  unpartitioned table, retention by a batched DELETE of published rows (as today's purge).
- ``c0`` xid horizon with a position cursor: ``position > cursor AND xid <
  pg_snapshot_xmin(pg_current_snapshot())``. Also expected to fail: xids are assigned in
  a different order than positions.
- ``c`` xid horizon (watermill-sql): rows carry their transaction's ``xid8``
  (``pg_current_xact_id()``; every candidate's inserts take it before the position); the
  cursor is ``(xid, position)``, rows below the horizon are read in that order; one cursor
  UPDATE per page per lease partition.
- ``d`` tick batches (PgQ): a ticker records ``pg_current_snapshot()`` into a tick table
  (after ``--tick-rows`` new rows or ``--tick-interval``); batch N is the rows visible in
  tick N+1's snapshot and not in tick N's (``pg_visible_in_snapshot``), read in position
  order (consecutive small batches are merged: the rows visible in tick M's snapshot and
  not in tick N's); one cursor UPDATE per page per lease partition.

The traffic: ``--writers`` connections commit transactions of 1-10 rows of one key, out of
order (some take their xid before waiting, all sleep a random few milliseconds before
committing, 5 % roll back). Each transaction locks its key's row and stamps its rows with
the key's next version, so per key the stamps follow commit order. After the backlog is
read (the rate), the writers keep going; then a transaction holding an xid stays open
elsewhere in the database for ``--long-seconds``. At the end every committed id must
have been read exactly once, no rolled-back id read, and each key's stamps read in
increasing order: the check compares the writers' own record of committed ids with what
the reader returned, so it fails when a row is skipped.

``rows/s`` is the rows read from the reader's start until the last backlog row was read
(live rows read meanwhile included), divided by that time; best of ``--rounds`` rounds
run in ABBA order, every round's figure in brackets. Latencies are commit (the writer's
COMMIT returned) to read, for rows committed during the steady phase and during the long
transaction; the worst of the rounds.

Candidates ``a``, ``c0``, ``c`` and ``d`` use a table range-partitioned on the xid8 column;
for ``c`` and ``d`` a rotator detaches (CONCURRENTLY) and drops partitions that every
lease partition's progress has passed while the reader and writers run. Autovacuum is off
for the outbox tables (each is analyzed once, after its backlog); ``n_dead_tup`` is read at
the end. The design note that uses these figures: docs/relay-engine-design.md.

    python bench/engine_study.py [--rows 50000] [--rounds 2] [--only a,b,c0,c,d]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import psycopg
from common import DATABASE_URL

CANDIDATES = ("a", "b", "c0", "c", "d")
TITLES = {
    "a": "a keyset read, no writes (ceiling)",
    "b": "b read + UPDATE every row (today)",
    "c0": "c0 xid horizon, position cursor",
    "c": "c xid horizon, (xid, position) cursor",
    "d": "d tick snapshots (PgQ batches)",
}
#: Candidates expected to fail the check (they show that it can fail).
UNSAFE = {"a", "c0"}
KEYS = 64
PAYLOAD = b'{"order_id": 1, "customer": "customer-1", "total": "123.45", "note": "' + (
    b"x" * 150 + b'"}'
)


def conninfo() -> str:
    """A libpq URL from the SQLAlchemy one the other benchmarks use."""
    return DATABASE_URL.replace("postgresql+psycopg://", "postgresql://", 1)


def connect() -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo(), autocommit=True, application_name="postroom-engine-study")


def slot_of(key: str, slots: int) -> int:
    return zlib.crc32(key.encode()) % slots


@dataclass
class Options:
    rows: int
    slots: int
    page: int
    writers: int
    live_seconds: float
    long_seconds: float
    width: int
    tick_rows: int
    tick_interval: float


@dataclass
class Record:
    """What the writers committed and what the reader returned, with times."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    committed: dict[int, float] = field(default_factory=dict)  # id -> commit time
    aborted: set[int] = field(default_factory=set)
    read: list[int] = field(default_factory=list)
    read_at: dict[int, float] = field(default_factory=dict)
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> last read
    order_violations: int = 0

    def commit(self, ids: list[int], at: float) -> None:
        with self.lock:
            for i in ids:
                self.committed[i] = at

    def saw(self, rows: list[tuple[Any, ...]], at: float) -> None:
        """Rows as (id, key, version, seq), in the order the reader returns them."""
        for row_id, key, version, seq in rows:
            self.read.append(row_id)
            self.read_at.setdefault(row_id, at)
            last = self.stamps.get(key)
            if last is not None and (version, seq) <= last:
                self.order_violations += 1
            self.stamps[key] = (version, seq)


class Study:
    """One candidate's run on its own tables in the scratch schema."""

    def __init__(self, schema: str, candidate: str, options: Options):
        self.s = schema
        self.c = candidate
        self.o = options
        self.t = f"{schema}.outbox_{candidate}"
        self.record = Record()
        self.stop_writers = threading.Event()
        self.stop_all = threading.Event()
        self.ids = itertools.count(options.rows + 1)
        self.errors: list[str] = []
        self.rotations: list[float] = []  # seconds per detach + drop
        self.purged = 0
        self.partitions: list[tuple[int, int]] = []  # (lo, hi) attached, ascending
        self.caught_up_at: float | None = None
        self.reader_started = 0.0
        self.max_page_seconds = 0.0
        self.ticks = 0
        self.last_tick_at = 0.0
        self.max_tick_gap = 0.0
        self.phase1_started = False
        self.long_window: tuple[float, float] = (0.0, 0.0)
        self.phase1_window: tuple[float, float] = (0.0, 0.0)

    # ------------------------------------------------------------------ schema

    def create(self, db: psycopg.Connection[Any]) -> None:
        t = self.t
        db.execute(f"CREATE SEQUENCE {t}_pos")
        db.execute(f"CREATE TABLE {self.s}.keys_{self.c} (key text PRIMARY KEY, version int)")
        db.execute(
            f"INSERT INTO {self.s}.keys_{self.c} "
            f"SELECT 'customer-' || i, 0 FROM generate_series(0, {KEYS - 1}) AS i"
        )
        columns = f"""
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    position bigint NOT NULL DEFAULT nextval('{t}_pos'),
    slot smallint NOT NULL,
    id bigint NOT NULL,
    key text NOT NULL,
    version int NOT NULL,
    seq int NOT NULL,
    payload bytea NOT NULL,
    headers jsonb NOT NULL DEFAULT '{{"source": "bench"}}',
    created_at timestamptz NOT NULL DEFAULT now()"""
        if self.c == "b":
            db.execute(
                f"CREATE TABLE {t} ({columns}, status text NOT NULL DEFAULT 'pending', "
                "published_at timestamptz, PRIMARY KEY (position)) "
                "WITH (autovacuum_enabled = false)"
            )
            db.execute(
                f"CREATE INDEX ON {t} (slot, position) WHERE status = 'pending'",
            )
            db.execute(f"CREATE INDEX ON {t} (published_at) WHERE status = 'published'")
        else:
            db.execute(f"CREATE TABLE {t} ({columns}) PARTITION BY RANGE (xid)")
            if self.c in ("a", "c0", "d"):
                db.execute(f"CREATE INDEX ON {t} (slot, position)")
            if self.c == "c":
                db.execute(f"CREATE INDEX ON {t} (slot, xid, position)")
            if self.c == "d":
                db.execute(f"CREATE INDEX ON {t} (slot, xid)")
            now = int(db.execute("SELECT pg_current_xact_id()::text").fetchone()[0])  # type: ignore[index]
            self.partitions = []
            self.extend(db, now, start=now - now % self.o.width)
        db.execute(
            f"CREATE TABLE {self.s}.cursors_{self.c} (slot smallint PRIMARY KEY, "
            "xid xid8 NOT NULL DEFAULT '0', position bigint NOT NULL DEFAULT 0, "
            "tick bigint NOT NULL DEFAULT 1)"
        )
        db.execute(
            f"INSERT INTO {self.s}.cursors_{self.c} (slot) "
            f"SELECT generate_series(0, {self.o.slots - 1})"
        )
        if self.c == "d":
            db.execute(
                f"CREATE TABLE {self.s}.ticks (id bigint PRIMARY KEY, "
                "snapshot pg_snapshot NOT NULL, before_position bigint NOT NULL, "
                "last_position bigint NOT NULL, "
                "at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            self.tick(db)

    def extend(self, db: psycopg.Connection[Any], current: int, start: int | None = None) -> None:
        """Keep partitions ready for 64 widths of xids past ``current``."""
        lo = start if start is not None else self.partitions[-1][1]
        while lo < current + 64 * self.o.width:
            hi = lo + self.o.width
            db.execute(
                f"CREATE TABLE {self.t}_{lo} PARTITION OF {self.t} "
                f"FOR VALUES FROM ('{lo}') TO ('{hi}') WITH (autovacuum_enabled = false)"
            )
            self.partitions.append((lo, hi))
            lo = hi

    # ------------------------------------------------------------------ writers

    def fill(self, db: psycopg.Connection[Any]) -> None:
        """The backlog: ``rows`` rows over the keys, 500 per transaction, ids 1..rows.

        Each key's versions follow the same order as its positions (one filling session)."""
        done = 0
        while done < self.o.rows:
            n = min(500, self.o.rows - done)
            with db.transaction():
                db.execute(
                    f"""
WITH x AS MATERIALIZED (SELECT pg_current_xact_id() AS xid)
INSERT INTO {self.t} (xid, slot, id, key, version, seq, payload)
SELECT x.xid, (%(slots)s::int[])[i %% {KEYS} + 1], i, 'customer-' || (i %% {KEYS}), i, 0,
       %(payload)s
FROM x, generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i ORDER BY i""",
                    {
                        "slots": [slot_of(f"customer-{k}", self.o.slots) for k in range(KEYS)],
                        "payload": PAYLOAD,
                        "lo": done + 1,
                        "hi": done + n,
                    },
                )
            self.record.commit(list(range(done + 1, done + n + 1)), time.monotonic())
            done += n
        db.execute(
            f"UPDATE {self.s}.keys_{self.c} SET version = %(v)s",
            {"v": self.o.rows + 1},
        )

    def writer(self, number: int) -> None:
        rng = random.Random(number)
        insert = (
            "WITH x AS MATERIALIZED (SELECT pg_current_xact_id() AS xid) "
            f"INSERT INTO {self.t} (xid, slot, id, key, version, seq, payload) "
            "SELECT x.xid, %(slot)s, i.id, %(key)s, %(version)s, i.n, %(payload)s "
            "FROM x, unnest(%(ids)s::bigint[]) WITH ORDINALITY AS i(id, n)"
        )
        lock = (
            f"UPDATE {self.s}.keys_{self.c} SET version = version + 1 "
            "WHERE key = %s RETURNING version"
        )
        try:
            with psycopg.connect(conninfo(), application_name="postroom-engine-study") as db:
                while not self.stop_writers.is_set():
                    key = f"customer-{rng.randrange(KEYS)}"
                    ids = [next(self.ids) for _ in range(rng.randint(1, 10))]
                    if rng.random() < 0.5:  # take an xid now, write later
                        db.execute("SELECT pg_current_xact_id()")
                        time.sleep(rng.uniform(0, 0.004))
                    version = db.execute(lock, (key,)).fetchone()[0]  # type: ignore[index]
                    db.execute(
                        insert,
                        {
                            "slot": slot_of(key, self.o.slots),
                            "key": key,
                            "version": version,
                            "ids": ids,
                            "payload": PAYLOAD,
                        },
                    )
                    time.sleep(rng.uniform(0, 0.008))
                    if rng.random() < 0.05:
                        db.rollback()
                        with self.record.lock:
                            self.record.aborted.update(ids)
                    else:
                        db.commit()
                        self.record.commit(ids, time.monotonic())
        except Exception as error:  # reported in the table
            self.errors.append(f"writer: {error}")

    def long_transaction(self) -> None:
        with psycopg.connect(conninfo(), application_name="postroom-engine-study") as db:
            db.execute("SELECT pg_current_xact_id()")
            started = time.monotonic()
            time.sleep(self.o.long_seconds)
            db.commit()
            self.long_window = (started, time.monotonic())

    # ------------------------------------------------------------------ ticker

    def position_sql(self) -> str:
        """The last position handed out (0 before the first)."""
        return (
            f"SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {self.t}_pos"
        )

    def tick(self, db: psycopg.Connection[Any]) -> None:
        """One tick: the snapshot and the position sequence's value, under a lock so tick
        ids follow snapshot order."""
        with db.transaction():
            # A tick lost in a crash of PostgreSQL is harmless: progress that names it is
            # committed later, and WAL is flushed in order.
            db.execute("SET LOCAL synchronous_commit = off")
            db.execute(f"LOCK TABLE {self.s}.ticks IN EXCLUSIVE MODE")
            before = db.execute(self.position_sql()).fetchone()[0]  # type: ignore[index]
            # A new statement: its snapshot is taken after ``before`` was read, and the
            # sequence's value read inside it is at least every visible row's position.
            db.execute(
                f"INSERT INTO {self.s}.ticks (id, snapshot, before_position, last_position) "
                f"SELECT coalesce(max(id), 0) + 1, pg_current_snapshot(), %(before)s, "
                f"({self.position_sql()}) FROM {self.s}.ticks",
                {"before": before},
            )
        self.ticks += 1
        now = time.monotonic()
        if self.last_tick_at and self.phase1_started and not self.stop_writers.is_set():
            self.max_tick_gap = max(self.max_tick_gap, now - self.last_tick_at)
        self.last_tick_at = now

    def ticker(self) -> None:
        last_position, last_at = -1, 0.0
        with connect() as db:
            while not self.stop_all.is_set():
                position = db.execute(f"SELECT last_value FROM {self.t}_pos").fetchone()[0]  # type: ignore[index]
                now = time.monotonic()
                due = now - last_at >= self.o.tick_interval
                if (position != last_position and due) or (
                    position - last_position >= self.o.tick_rows
                ):
                    self.tick(db)
                    last_position, last_at = position, now
                elif now - last_at >= 1.0:  # idle tick: horizons move on
                    self.tick(db)
                    last_at = now
                time.sleep(0.005)

    # ------------------------------------------------------------------ reader

    def columns(self) -> str:
        return "r.id, r.key, r.version, r.seq, r.xid::text, r.position, r.payload, r.headers::text"

    def reader(self) -> None:
        try:
            with connect() as db:
                self.reader_started = time.monotonic()
                read = {"a": self.read_a, "b": self.read_b, "c0": self.read_c0}.get(
                    self.c, self.read_c if self.c == "c" else self.read_d
                )
                state: dict[int, Any] = {}
                backlog = 0
                while not self.stop_all.is_set():
                    got = 0
                    for slot in range(self.o.slots):
                        started = time.monotonic()
                        rows = read(db, slot, state)
                        self.max_page_seconds = max(
                            self.max_page_seconds, time.monotonic() - started
                        )
                        if rows:
                            self.record.saw([r[:4] for r in rows], time.monotonic())
                            got += len(rows)
                            backlog += sum(1 for r in rows if r[0] <= self.o.rows)
                            if self.caught_up_at is None and backlog >= self.o.rows:
                                self.caught_up_at = time.monotonic()
                    if not got:
                        time.sleep(0.005)
        except Exception as error:  # reported in the table
            self.errors.append(f"reader: {error}")

    def read_a(self, db: psycopg.Connection[Any], slot: int, state: dict[int, Any]) -> list[Any]:
        rows = db.execute(
            f"SELECT {self.columns()} FROM {self.t} AS r WHERE r.slot = %(slot)s "
            "AND r.position > %(after)s ORDER BY r.position LIMIT %(limit)s",
            {"slot": slot, "after": state.get(slot, 0), "limit": self.o.page},
        ).fetchall()
        if rows:
            state[slot] = rows[-1][5]
        return rows

    def read_b(self, db: psycopg.Connection[Any], slot: int, state: dict[int, Any]) -> list[Any]:
        rows = db.execute(
            f"SELECT {self.columns()} FROM {self.t} AS r WHERE r.slot = %(slot)s "
            "AND r.status = 'pending' ORDER BY r.position LIMIT %(limit)s",
            {"slot": slot, "limit": self.o.page},
        ).fetchall()
        if rows:
            db.execute(
                f"UPDATE {self.t} SET status = 'published', published_at = now() "
                "WHERE position = ANY(%(positions)s) AND status = 'pending'",
                {"positions": [r[5] for r in rows]},
            )
        return rows

    def save_cursor(
        self, db: psycopg.Connection[Any], slot: int, xid: str, position: int, tick: int = 1
    ) -> None:
        db.execute(
            f"UPDATE {self.s}.cursors_{self.c} SET xid = %(xid)s::xid8, "
            "position = %(position)s, tick = %(tick)s WHERE slot = %(slot)s",
            {"xid": xid, "position": position, "tick": tick, "slot": slot},
        )

    def read_c0(self, db: psycopg.Connection[Any], slot: int, state: dict[int, Any]) -> list[Any]:
        rows = db.execute(
            f"SELECT {self.columns()} FROM {self.t} AS r WHERE r.slot = %(slot)s "
            "AND r.position > %(after)s AND r.xid < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY r.position LIMIT %(limit)s",
            {"slot": slot, "after": state.get(slot, 0), "limit": self.o.page},
        ).fetchall()
        if rows:
            state[slot] = rows[-1][5]
            self.save_cursor(db, slot, rows[-1][4], rows[-1][5])
        return rows

    def read_c(self, db: psycopg.Connection[Any], slot: int, state: dict[int, Any]) -> list[Any]:
        xid, position = state.get(slot, ("0", 0))
        found = db.execute(
            f"""
WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon)
SELECT h.horizon::text, p.* FROM h LEFT JOIN LATERAL (
    SELECT {self.columns()} FROM {self.t} AS r
    WHERE r.slot = %(slot)s AND r.xid >= %(xid)s::xid8
      AND (r.xid, r.position) > (%(xid)s::xid8, %(position)s)
      AND r.xid < h.horizon
    ORDER BY r.xid, r.position LIMIT %(limit)s
) AS p ON true""",
            {"slot": slot, "xid": xid, "position": position, "limit": self.o.page},
        ).fetchall()
        horizon = found[0][0]
        rows = [r[1:] for r in found if r[1] is not None]
        cursor = (rows[-1][4], rows[-1][5]) if rows else (xid, position)
        if len(rows) < self.o.page and int(horizon) > int(cursor[0]):
            # Everything below the horizon is read: the cursor moves up to it, so the
            # progress of a quiet lease partition passes old partitions too.
            cursor = (horizon, 0)
        if cursor != (xid, position):
            state[slot] = cursor
            self.save_cursor(db, slot, cursor[0], cursor[1])
        return rows

    def read_d(self, db: psycopg.Connection[Any], slot: int, state: dict[int, Any]) -> list[Any]:
        """One page of the batch from tick ``tick`` to a later tick (position order).

        The batch is every row visible in the later tick's snapshot and not in the old
        one's: the batches between consecutive ticks, merged (up to about four pages of
        positions for each lease partition, at least one tick). Rows whose xid was not yet
        running at the old tick (``xid >= xmax``) are found by position: their xid was
        taken after tick ``tick - 1`` committed, and each row takes its position after its
        xid, so they lie after that tick's ``before_position``, and at or before the new
        tick's ``last_position``. Rows of transactions running at the old tick (its xip
        list) are found by xid. Both must be visible in the new tick."""
        tick, after, batch = state.get(slot, (1, 0, None))
        if batch is None:
            ticks = db.execute(
                f"SELECT id, snapshot::text, before_position, last_position "
                f"FROM {self.s}.ticks WHERE id >= %(t)s - 1 ORDER BY id LIMIT 256",
                {"t": tick},
            ).fetchall()
            first = 1 if ticks[0][0] == tick - 1 else 0
            if len(ticks) < first + 2:
                return []
            old = ticks[first]
            cap = old[3] + 4 * self.o.page * self.o.slots
            new = ticks[first + 1]
            for later in ticks[first + 2 :]:
                if later[3] > cap:
                    break
                new = later
            batch = {
                "lo": old[1].split(":")[1],
                "hi": new[1].split(":")[1],
                "xip": [x for x in old[1].split(":")[2].split(",") if x],
                "new": new[1],
                "from": ticks[0][2] if first else 0,
                "to": new[3],
                "end": new[0],
            }
        part = f"""
    SELECT {self.columns()} FROM {self.t} AS r
    WHERE r.slot = %(slot)s AND {{which}}
      AND pg_visible_in_snapshot(r.xid, %(new)s::pg_snapshot) AND r.position > %(after)s
    ORDER BY r.position LIMIT %(limit)s"""
        sql = (
            "("
            + part.format(
                which="r.xid >= %(lo)s::xid8 AND r.xid < %(hi)s::xid8 "
                "AND r.position > %(from)s AND r.position <= %(to)s"
            )
            + ")"
        )
        if batch["xip"]:
            sql += " UNION ALL (" + part.format(which="r.xid = ANY(%(xip)s::xid8[])") + ")"
            sql = f"SELECT * FROM ({sql}) AS b ORDER BY 6 LIMIT %(limit)s"
        rows = db.execute(
            sql, {**batch, "slot": slot, "after": after, "limit": self.o.page}
        ).fetchall()
        if len(rows) < self.o.page:
            state[slot] = (batch["end"], 0, None)  # batch done: on to the next one
        else:
            state[slot] = (tick, rows[-1][5], batch)
        self.save_cursor(db, slot, "0", state[slot][1], state[slot][0])
        return rows

    # ------------------------------------------------------------------ retention

    def horizon(self, db: psycopg.Connection[Any]) -> tuple[int, list[int]]:
        """(xid bound, xids still unread below it): every row with an xid below the bound
        and not in the list has been read by every lease partition."""
        if self.c == "c":
            row = db.execute(
                f"SELECT xid::text FROM {self.s}.cursors_{self.c} ORDER BY xid LIMIT 1"
            ).fetchone()
            return int(row[0]), []  # type: ignore[index]
        # d: the oldest tick a lease partition still has to start from; all the xids
        # visible in its snapshot are read.
        row = db.execute(
            f"SELECT t.snapshot::text FROM {self.s}.ticks AS t "
            f"WHERE t.id = (SELECT min(tick) FROM {self.s}.cursors_{self.c})"
        ).fetchone()
        _, xmax, xip = row[0].split(":")  # type: ignore[index]
        return int(xmax), [int(x) for x in xip.split(",") if x]

    def rotator(self) -> None:
        try:
            with connect() as db:
                while not self.stop_all.is_set():
                    current = int(db.execute("SELECT pg_current_xact_id()::text").fetchone()[0])  # type: ignore[index]
                    self.extend(db, current)
                    if self.c in ("c", "d"):
                        bound, unread = self.horizon(db)
                        lo, hi = self.partitions[0]
                        if hi <= bound and not any(lo <= x < hi for x in unread):
                            started = time.monotonic()
                            db.execute(
                                f"ALTER TABLE {self.t} DETACH PARTITION {self.t}_{lo} CONCURRENTLY"
                            )
                            db.execute(f"DROP TABLE {self.t}_{lo}")
                            self.rotations.append(time.monotonic() - started)
                            self.partitions.pop(0)
                            continue
                    time.sleep(0.05)
        except Exception as error:  # reported in the table
            self.errors.append(f"rotator: {error}")

    def purger(self) -> None:
        """Today's retention for ``b``: delete published rows in batches."""
        try:
            with connect() as db:
                while not self.stop_all.is_set():
                    cur = db.execute(
                        f"DELETE FROM {self.t} WHERE position IN (SELECT position FROM {self.t} "
                        "WHERE status = 'published' AND published_at < now() - interval '1 second' "
                        "ORDER BY published_at LIMIT 5000 FOR UPDATE SKIP LOCKED)"
                    )
                    self.purged += cur.rowcount
                    time.sleep(0.2)
        except Exception as error:  # reported in the table
            self.errors.append(f"purger: {error}")

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        with connect() as db:
            self.create(db)
            with psycopg.connect(conninfo(), application_name="postroom-engine-study") as filler:
                self.fill(filler)
            # Statistics, as autovacuum's analyze would give a table that has run for a
            # while (it is off here): without them the planner may walk the wrong index.
            db.execute(f"ANALYZE {self.t}")
            if self.c == "d":
                self.tick(db)  # the backlog's batches exist before the reader starts
        threads = [threading.Thread(target=self.writer, args=(n,)) for n in range(self.o.writers)]
        helpers = []
        if self.c == "d":
            helpers.append(threading.Thread(target=self.ticker))
        if self.c in ("a", "c0", "c", "d"):
            helpers.append(threading.Thread(target=self.rotator))
        if self.c == "b":
            helpers.append(threading.Thread(target=self.purger))
        reader = threading.Thread(target=self.reader)
        for thread in [*helpers, reader, *threads]:
            thread.start()
        # Phase 1: the backlog is read while the writers commit; then steady traffic.
        deadline = time.monotonic() + 120
        while self.caught_up_at is None and time.monotonic() < deadline and not self.errors:
            time.sleep(0.01)
        phase1 = time.monotonic()
        self.phase1_started = True
        time.sleep(self.o.live_seconds)
        self.phase1_window = (phase1, time.monotonic())
        # Phase 2: a transaction holding an xid stays open elsewhere in the database.
        self.long_transaction()
        time.sleep(1.0)
        self.stop_writers.set()
        for thread in threads:
            thread.join()
        # Drain: until everything committed was read, or 3 s without progress.
        last, still = -1, time.monotonic()
        while time.monotonic() - still < 3.0 and not self.errors:
            if len(self.record.read) >= len(self.record.committed):
                break
            if len(self.record.read) != last:
                last, still = len(self.record.read), time.monotonic()
            time.sleep(0.05)
        time.sleep(0.2)
        self.stop_all.set()
        for thread in [*helpers, reader]:
            thread.join()
        return self.report()

    def table_state(self) -> tuple[int, int, int]:
        """(n_dead_tup, live tuples, bytes) of the outbox and its partitions."""
        time.sleep(1.2)  # backends flush their statistics at most once a second
        with connect() as db:
            db.execute("SELECT pg_stat_clear_snapshot()")
            row = db.execute(
                "SELECT coalesce(sum(s.n_dead_tup), 0), coalesce(sum(s.n_live_tup), 0), "
                "coalesce(sum(pg_total_relation_size(t.relid)), 0) "
                "FROM (SELECT relid FROM pg_partition_tree(%(t)s::regclass) "
                "UNION SELECT %(t)s::regclass) AS t "
                "LEFT JOIN pg_stat_user_tables AS s ON s.relid = t.relid",
                {"t": self.t},
            ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])  # type: ignore[index]

    def report(self) -> dict[str, Any]:
        r = self.record
        committed = set(r.committed)
        read = set(r.read)
        skipped = len(committed - read)
        twice = len(r.read) - len(read)
        phantom = len(read & r.aborted) + len(read - committed - r.aborted)
        caught = self.caught_up_at or time.monotonic()
        rate = len([i for i in r.read if r.read_at[i] <= caught]) / (caught - self.reader_started)

        def latencies(window: tuple[float, float]) -> dict[str, float]:
            samples = [
                max(0.0, r.read_at[i] - at)
                for i, at in r.committed.items()
                if window[0] <= at <= window[1] and i in r.read_at
            ]
            if len(samples) < 2:
                return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
            cuts = statistics.quantiles(samples, n=100, method="inclusive")
            return {"p50": cuts[49] * 1e3, "p99": cuts[98] * 1e3, "max": max(samples) * 1e3}

        dead, live, size = self.table_state()
        return {
            "candidate": self.c,
            "rate": rate,
            "committed": len(committed),
            "read": len(r.read),
            "skipped": skipped,
            "twice": twice,
            "phantom": phantom,
            "order_violations": r.order_violations,
            "ok": not (skipped or twice or phantom or r.order_violations or self.errors),
            "latency": latencies(self.phase1_window),
            "long_latency": latencies(self.long_window),
            "rotations": len(self.rotations),
            "rotation_max_ms": max(self.rotations, default=0.0) * 1e3,
            "purged": self.purged,
            "dead_tuples": dead,
            "live_tuples": live,
            "bytes": size,
            "ticks": self.ticks,
            "max_tick_gap_ms": self.max_tick_gap * 1e3,
            "max_page_ms": self.max_page_seconds * 1e3,
            "errors": self.errors,
        }


def run(options: Options, candidates: list[str], rounds: int) -> list[dict[str, Any]]:
    """Each candidate ``rounds`` times, in the given order and then reversed (ABBA ...),
    each round in a fresh scratch schema; the results merged per candidate."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in candidates}
    for i in range(rounds):
        schema = f"engine_study_{uuid.uuid4().hex[:8]}"
        with connect() as db:
            db.execute(f"CREATE SCHEMA {schema}")
        try:
            for candidate in candidates if i % 2 == 0 else candidates[::-1]:
                print(f"-- round {i + 1}: {TITLES[candidate]} ...", flush=True)
                runs[candidate].append(Study(schema, candidate, options).run())
        finally:
            with connect() as db:
                db.execute(f"DROP SCHEMA {schema} CASCADE")
    return [merge(runs[c]) for c in candidates]


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The best rate of the rounds (the least disturbed by whatever else the machine ran),
    every rate in ``rates``; failures added up; the worst latencies, sizes and pauses."""
    merged = dict(max(results, key=lambda r: r["rate"]))
    merged["rates"] = [round(r["rate"]) for r in results]
    for key in ("committed", "read", "skipped", "twice", "phantom", "order_violations"):
        merged[key] = sum(r[key] for r in results)
    for key in ("rotations", "purged", "ticks"):
        merged[key] = sum(r[key] for r in results)
    for key in ("dead_tuples", "live_tuples", "bytes", "rotation_max_ms", "max_page_ms"):
        merged[key] = max(r[key] for r in results)
    merged["max_tick_gap_ms"] = max(r["max_tick_gap_ms"] for r in results)
    for key in ("latency", "long_latency"):
        merged[key] = {
            q: max((r[key][q] for r in results if r[key][q] == r[key][q]), default=float("nan"))
            for q in ("p50", "p99", "max")
        }
    merged["ok"] = all(r["ok"] for r in results)
    merged["errors"] = [e for r in results for e in r["errors"]]
    return merged


def fmt(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"  # NaN: no samples


def table(results: list[dict[str, Any]]) -> str:
    base = next((r["rate"] for r in results if r["candidate"] == "a"), None)
    header = [
        "candidate",
        "rows/s best (rounds)",
        "x a",
        "committed",
        "skipped",
        "twice",
        "aborted read",
        "key order viol.",
        "check",
        "commit->read p50/p99 ms",
        "long txn p50/p99/max ms",
        "rotated (max ms)",
        "slowest page ms",
        "n_dead_tup",
        "size MB",
    ]
    body = []
    for r in results:
        expected = " (expected)" if r["candidate"] in UNSAFE and not r["ok"] else ""
        lat, long = r["latency"], r["long_latency"]
        rotated = (
            f"{r['rotations']} ({r['rotation_max_ms']:.0f})"
            if r["candidate"] in ("c", "d")
            else (f"purged {r['purged']:,}" if r["candidate"] == "b" else "-")
        )
        body.append(
            [
                TITLES[r["candidate"]],
                f"{r['rate']:,.0f} ({', '.join(f'{x:,}' for x in r['rates'])})",
                f"{r['rate'] / base:.2f}" if base else "",
                f"{r['committed']:,}",
                str(r["skipped"]),
                str(r["twice"]),
                str(r["phantom"]),
                str(r["order_violations"]),
                ("pass" if r["ok"] else "FAIL") + expected,
                f"{fmt(lat['p50'])}/{fmt(lat['p99'])}",
                f"{fmt(long['p50'])}/{fmt(long['p99'])}/{fmt(long['max'])}",
                rotated,
                f"{r['max_page_ms']:,.0f}",
                f"{r['dead_tuples']:,}",
                f"{r['bytes'] / 1e6:.1f}",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    for r in results:
        extra = (
            f"; {r['ticks']} ticks, longest gap {r['max_tick_gap_ms']:.0f} ms" if r["ticks"] else ""
        )
        lines.append(
            f"{r['candidate']}: read {r['read']:,} of {r['committed']:,} committed, "
            f"{r['live_tuples']:,} live tuples left{extra}"
        )
    for r in results:
        if r["errors"]:
            lines.append(f"{r['candidate']} errors: {'; '.join(r['errors'][:3])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=50_000, help="committed backlog")
    parser.add_argument("--slots", type=int, default=4, help="lease partitions")
    parser.add_argument("--page", type=int, default=500)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--live-seconds", type=float, default=2.0)
    parser.add_argument("--long-seconds", type=float, default=2.0)
    parser.add_argument("--width", type=int, default=256, help="xids per outbox partition")
    parser.add_argument("--tick-rows", type=int, default=2000)
    parser.add_argument("--tick-interval", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds; best rate kept")
    parser.add_argument("--only", default=",".join(CANDIDATES))
    args = parser.parse_args()
    candidates = [c for c in args.only.split(",") if c]
    for c in candidates:
        if c not in CANDIDATES:
            parser.error(f"unknown candidate {c!r}; choose from {', '.join(CANDIDATES)}")
    options = Options(
        args.rows,
        args.slots,
        args.page,
        args.writers,
        args.live_seconds,
        args.long_seconds,
        args.width,
        args.tick_rows,
        args.tick_interval,
    )
    started = time.monotonic()
    results = run(options, candidates, args.rounds)
    print()
    print(table(results))
    print(f"\n{time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
