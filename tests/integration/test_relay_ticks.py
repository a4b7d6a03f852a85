"""Tick batches read every committed row of the stream exactly once (postroom.relay.ticks).

Writers commit out of order (some take their xid, then wait before COMMIT; some roll
back) while a reader ticks and reads batches page by page, advancing its (tick, position)
progress. The checks compare what the writers committed with what the reader returned; a
reader built without part B of the read shows that they fail when rows are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postroom.errors import SnapshotWentBackError
from postroom.relay.ticks import (
    Progress,
    StreamTables,
    choose_batch,
    enqueue_sql,
    new_xids_part_sql,
    page_parameters,
    page_sql,
    progress_after,
    read_page,
    read_page_sql,
    scratch_tables_sql,
    snapshot_xmax,
    take_tick,
)
from tests.support.database import drop_schema, unique_schema


@contextlib.asynccontextmanager
async def four_connections(
    engine: AsyncEngine,
) -> AsyncIterator[tuple[AsyncConnection, AsyncConnection, AsyncConnection, AsyncConnection]]:
    """Four connections of ``engine``, closed together."""
    async with contextlib.AsyncExitStack() as stack:
        a, b, c, d = [await stack.enter_async_context(engine.connect()) for _ in range(4)]
        yield a, b, c, d


PARTITIONS = (0, 1)
KEYS = 8


@pytest.fixture
async def stream(engine: Engine, async_engine: AsyncEngine) -> AsyncIterator[StreamTables]:
    """A scratch stream and tick table in a schema of this test's own, with a first tick."""
    schema = unique_schema()
    tables = StreamTables(schema, "outbox")
    async with async_engine.begin() as connection:
        await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        for statement in scratch_tables_sql(tables):
            await connection.execute(text(statement))
        await connection.execute(
            text(f'CREATE TABLE "{schema}".keys (key text PRIMARY KEY, version int NOT NULL)')
        )
        await connection.execute(
            text(
                f"INSERT INTO \"{schema}\".keys SELECT 'key-' || i, 0 "
                f"FROM generate_series(0, {KEYS - 1}) AS i"
            )
        )
    async with async_engine.connect() as connection:
        await take_tick(connection, tables)  # every progress starts from tick 1
    yield tables
    drop_schema(engine, schema)


async def write(
    connection: AsyncConnection, tables: StreamTables, partition: int, key: str, *stamps: Any
) -> list[uuid.UUID]:
    """Enqueue one row per stamp (its headers), in the caller's transaction; their ids."""
    ids = [uuid.uuid4() for _ in stamps]
    await connection.execute(
        text(enqueue_sql(tables)),
        {
            "partition": [partition] * len(ids),
            "id": ids,
            "topic": ["orders"] * len(ids),
            "key": [key] * len(ids),
            "payload": [b"{}"] * len(ids),
            "headers": [json.dumps(stamp) for stamp in stamps],
        },
    )
    return ids


@dataclass
class Reader:
    """A relay's read loop over some lease partitions, without a broker."""

    connection: AsyncConnection
    tables: StreamTables
    limit: int = 7
    span: int = 20
    sql: str = ""
    progress: dict[int, Progress] = field(
        default_factory=lambda: {p: Progress(1) for p in PARTITIONS}
    )
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    by_running_xid: int = 0
    """Rows whose xid was running at their batch's start tick (part B's share)."""

    async def step(self) -> int:
        """One page per lease partition (each choosing or resuming its batch); rows read."""
        got = 0
        for partition in PARTITIONS:
            progress = self.progress[partition]
            batch = await choose_batch(self.connection, self.tables, progress, self.span)
            if batch is None:
                continue
            parameters = page_parameters(batch, partition, progress.after_position, self.limit)
            result = await self.connection.execute(
                text(self.sql or read_page_sql(self.tables)), parameters
            )
            page = [tuple(row) for row in result]
            await self.connection.commit()
            self.progress[partition] = progress_after(batch, page, self.limit)
            self.rows.extend(page)
            self.by_running_xid += sum(1 for row in page if row[1] in parameters["running"])
            got += len(page)
        return got

    async def drain(self, tick: int) -> None:
        """Read until every partition's progress stands at ``tick``, between batches."""
        deadline = time.monotonic() + 20
        while any(p != Progress(tick) for p in self.progress.values()):
            assert time.monotonic() < deadline, f"stuck at {self.progress}"
            await self.step()

    def ids(self) -> list[uuid.UUID]:
        return [row[3] for row in self.rows]


@dataclass
class Traffic:
    """What writers committed and rolled back."""

    committed: set[uuid.UUID] = field(default_factory=set)
    aborted: set[uuid.UUID] = field(default_factory=set)


def check(reader: Reader, traffic: Traffic) -> dict[str, int]:
    """Skipped, read twice, rolled-back rows read, and per-key order violations."""
    ids = reader.ids()
    last: dict[str, tuple[int, int]] = {}
    violations = 0
    for row in reader.rows:
        stamp = (row[7]["v"], row[7]["n"])
        if row[5] in last and stamp <= last[row[5]]:
            violations += 1
        last[row[5]] = stamp
    return {
        "skipped": len(traffic.committed - set(ids)),
        "twice": len(ids) - len(set(ids)),
        "aborted read": len(set(ids) & traffic.aborted),
        "order violations": violations,
    }


async def writer(
    engine: AsyncEngine, tables: StreamTables, seed: int, stop: asyncio.Event, traffic: Traffic
) -> None:
    """Transactions of 1-5 rows of one key, its row locked and its version stamped."""
    rng = random.Random(seed)
    lock = text(
        f'UPDATE "{tables.schema}".keys SET version = version + 1 WHERE key = :key '
        "RETURNING version"
    )
    async with engine.connect() as connection:
        while not stop.is_set():
            number = rng.randrange(KEYS)
            key = f"key-{number}"
            if rng.random() < 0.5:  # the xid first, the key's lock and rows later
                await connection.execute(text("SELECT pg_current_xact_id()"))
                await asyncio.sleep(rng.uniform(0, 0.004))
            version = (await connection.execute(lock, {"key": key})).scalar_one()
            stamps = [{"v": version, "n": n} for n in range(rng.randint(1, 5))]
            ids = await write(connection, tables, PARTITIONS[number % 2], key, *stamps)
            await asyncio.sleep(rng.uniform(0, 0.008))
            if rng.random() < 0.1:
                await connection.rollback()
                traffic.aborted.update(ids)
            else:
                await connection.commit()
                traffic.committed.update(ids)


async def run_traffic(
    engine: AsyncEngine, tables: StreamTables, sql: str = "", seconds: float = 2.0
) -> tuple[Reader, Traffic]:
    """Four writers for ``seconds`` while a reader ticks every 10 ms and reads; then drain."""
    traffic, stop = Traffic(), asyncio.Event()
    async with engine.connect() as reading, engine.connect() as ticking:
        reader = Reader(reading, tables, sql=sql)

        async def ticker_and_reader() -> None:
            while not stop.is_set():
                await take_tick(ticking, tables)
                await reader.step()
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(writer(engine, tables, n, stop, traffic)) for n in range(4)]
        tasks.append(asyncio.create_task(ticker_and_reader()))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        last = await take_tick(ticking, tables)  # sees every commit above
        await reader.drain(last.id)
    return reader, traffic


async def test_out_of_order_commits_are_read_once_each_in_key_order(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    reader, traffic = await run_traffic(async_engine, stream)

    assert len(traffic.committed) > 200
    assert traffic.aborted
    assert check(reader, traffic) == {
        "skipped": 0,
        "twice": 0,
        "aborted read": 0,
        "order violations": 0,
    }
    assert reader.by_running_xid > 0  # transactions in flight across ticks were exercised


async def test_the_check_fails_when_the_read_leaves_out_part_b(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    broken = page_sql([new_xids_part_sql(stream)])
    reader, traffic = await run_traffic(async_engine, stream, sql=broken)

    assert check(reader, traffic)["skipped"] > 0


async def test_a_transaction_in_flight_across_a_tick_needs_part_b(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    broken = page_sql([new_xids_part_sql(stream)])
    async with four_connections(async_engine) as (held, other, c, d):
        late = await write(held, stream, 0, "key-0", {"v": 1, "n": 0})  # position 1, open
        early = await write(other, stream, 0, "key-1", {"v": 1, "n": 0})
        await other.commit()
        await take_tick(other, stream)  # tick 2: `late` still running
        whole, without_b = Reader(c, stream), Reader(d, stream, sql=broken)
        await whole.drain(2)
        await without_b.drain(2)
        await held.commit()
        await take_tick(other, stream)  # tick 3
        await whole.drain(3)
        await without_b.drain(3)

    assert whole.ids() == early + late
    assert without_b.ids() == early  # `late` is skipped for good


async def test_a_long_transaction_delays_only_its_own_rows(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    async with four_connections(async_engine) as (held, writing, ticking, reading):
        await held.execute(text("SELECT pg_current_xact_id()"))
        late = await write(held, stream, 1, "key-0", {"v": 1, "n": 0})
        reader = Reader(reading, stream)
        others: list[uuid.UUID] = []
        for n in range(5):
            committed = await write(writing, stream, n % 2, "key-1", {"v": n, "n": 0})
            await writing.commit()
            started = time.monotonic()
            tick = await take_tick(ticking, stream)
            await reader.drain(tick.id)
            assert time.monotonic() - started < 1.0
            assert reader.ids()[-1:] == committed
            others += committed
        assert late[0] not in reader.ids()
        await held.commit()
        tick = await take_tick(ticking, stream)
        await reader.drain(tick.id)

    assert sorted(reader.ids()) == sorted(others + late)
    assert len(reader.ids()) == len(set(reader.ids()))


async def test_a_reader_behind_by_several_ticks_merges_them(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    async with four_connections(async_engine) as (held, writing, c, d):
        late = await write(held, stream, 0, "key-0", {"v": 1, "n": 0})  # open across ticks 2-4
        written: list[uuid.UUID] = []
        for n in range(5):
            written += await write(writing, stream, 0, "key-1", {"v": n, "n": 0}, {"v": n, "n": 1})
            await writing.commit()
            if n == 3:
                await held.commit()
            await take_tick(writing, stream)  # ticks 2..6
        merged = Reader(c, stream, limit=100, span=1000)
        batch = await choose_batch(c, stream, Progress(1), merged.span)
        assert batch is not None
        assert (batch.start_tick, batch.end_tick) == (1, 6)
        await merged.drain(6)
        one_by_one = Reader(d, stream, limit=100, span=0)
        await one_by_one.drain(6)

    assert sorted(merged.ids()) == sorted(written + late)
    assert len(merged.ids()) == len(set(merged.ids()))
    assert sorted(one_by_one.ids()) == sorted(merged.ids())
    assert len(one_by_one.ids()) == len(set(one_by_one.ids()))


async def test_a_batch_resumed_mid_way_keeps_its_end_tick(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    async with async_engine.connect() as held, async_engine.connect() as other:
        late = await write(held, stream, 0, "key-0", {"v": 1, "n": 0})  # position 1, open
        rest = await write(other, stream, 0, "key-1", *({"v": 1, "n": n} for n in range(10)))
        await other.commit()
        await take_tick(other, stream)  # tick 2
        batch = await choose_batch(other, stream, Progress(1), span=1000)
        assert batch is not None
        first, progress = await read_page(other, stream, batch, 0, 0, 5)
        assert progress == Progress(1, 6, 2)
        await other.commit()
        await held.commit()
        await take_tick(other, stream)  # tick 3: `late` visible
        forgot = await choose_batch(other, stream, Progress(1, 6), span=1000)
        kept = await choose_batch(other, stream, progress, span=1000)
        assert forgot is not None
        assert kept is not None
        assert (forgot.end_tick, kept.end_tick) == (3, 2)
        # Forgetting the end merges tick 3 in, whose row below position 6 is then passed.
        rows, after = await read_page(other, stream, forgot, 0, 6, 100)
        assert [r[3] for r in rows] == rest[5:]
        assert after == Progress(3)
        reader = Reader(other, stream)
        reader.progress = {0: progress, 1: Progress(3)}
        await reader.drain(3)

    assert [r[3] for r in first] + reader.ids() == rest + late


async def test_a_tick_below_the_previous_snapshot_is_refused(
    async_engine: AsyncEngine, stream: StreamTables
) -> None:
    async with async_engine.connect() as connection:
        current = int(
            (await connection.execute(text("SELECT pg_current_xact_id()::text"))).scalar_one()
        )
        ahead = current + 1_000_000
        await connection.execute(
            text(
                f"INSERT INTO {stream.ticks} (id, snapshot, before_position, last_position) "
                "VALUES (2, CAST(:snapshot AS pg_snapshot), 0, 0)"
            ),
            {"snapshot": f"{ahead}:{ahead}:"},
        )
        await connection.commit()
        with pytest.raises(SnapshotWentBackError, match="postroom outbox rebase"):
            await take_tick(connection, stream)
        ticks = (await connection.execute(text(f"SELECT max(id) FROM {stream.ticks}"))).scalar()
        await connection.rollback()
        await connection.execute(text(f"DELETE FROM {stream.ticks} WHERE id = 2"))
        await connection.commit()
        tick = await take_tick(connection, stream)

    assert ticks == 2  # nothing written
    assert tick.id == 2
    assert snapshot_xmax(tick.snapshot) < ahead  # the real one, not the fake
