"""Limits that know the broker: oversized rows are dead at once, batches are bounded by bytes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom import Settings
from postroom.brokers.memory import MemoryBroker
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.relay.store import Connection, OutboxStore
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from postroom.urls import psycopg_conninfo
from tests.support.processes import RelayFleet
from tests.support.relaying import relay_settings
from tests.support.relaying import running_relay as running
from tests.support.waiting import wait_until


@pytest.fixture
def settings(database_url: str, tables: Tables) -> Settings:
    """Relay settings with short leases and backoff, so tests run in seconds."""
    return relay_settings(database_url, tables)


def rows(engine: Engine, tables: Tables) -> list[Any]:
    with engine.connect() as connection:
        return list(
            connection.execute(select(tables.outbox).order_by(tables.outbox.c.position)).all()
        )


MIB = 1024 * 1024


async def test_a_message_too_large_for_the_broker_is_dead_at_once_and_others_flow(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker(max_message_bytes=50_000)
    with Session(engine) as session:
        big = outbox.enqueue(session, "t", {"n": 0}, key="k", headers={"blob": "x" * 100_000})
        after = outbox.enqueue(session, "t", {"n": 1}, key="k")
        others = [outbox.enqueue(session, "t", {"n": i}, key=f"o{i}") for i in range(10)]
        session.commit()
    async with running(Relay(settings, broker.publisher())):
        await wait_until(lambda: len(broker.messages()) == 11, within=15, what="11 published")
    state = {r.id: r for r in rows(engine, tables)}
    dead = state[big.id]
    assert dead.status == "dead"
    assert dead.attempts == 1, "something that can never fit is not retried"
    assert "too large for the broker" in dead.last_error
    assert "> limit 50000" in dead.last_error
    assert {m.id for m in broker.messages()} == {after.id, *(m.id for m in others)}


async def test_the_claim_stops_at_the_byte_budget_but_takes_at_least_one_row(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    with Session(engine) as session:
        for i in range(6):
            outbox.enqueue(session, "t", b"x" * MIB, key=f"k{i}")
        session.commit()
    connection = Connection(psycopg_conninfo(settings.database_url), settings.database_url)
    store = OutboxStore(connection, tables)
    tokens = {p: uuid.uuid4() for p in range(64)}
    try:
        three = await store.claim(tokens, limit=500, max_bytes=3 * MIB + 100)
        one = await store.claim(tokens, limit=500, max_bytes=1)
        every = await store.claim(tokens, limit=500, max_bytes=100 * MIB)
        capped = await store.claim(tokens, limit=2, max_bytes=100 * MIB)
    finally:
        await connection.close()
    assert len(three.rows) == 3
    assert len(one.rows) == 1
    assert len(every.rows) == 6
    assert len(capped.rows) == 2
    assert [r.position for r in three.rows] == [r.position for r in every.rows[:3]]


@pytest.fixture
def fleet(database_url: str, tables: Tables, tmp_path: Path) -> Iterator[RelayFleet]:
    """Relay processes on this test's schema; all killed at teardown."""
    assert tables.schema is not None
    with RelayFleet(database_url, schema=tables.schema, log_dir=tmp_path / "relays") as relays:
        yield relays


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _pending(engine: Engine, tables: Tables) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    f"SELECT count(*) FROM {quoted_table(tables.outbox)} "
                    "WHERE status <> 'published'"
                )
            ).scalar_one()
        )


@pytest.mark.timeout(180)
async def test_relay_memory_is_bounded_by_bytes_not_rows(
    record_property: Any,
    rabbitmq: str,
    fleet: RelayFleet,
    engine: Engine,
    outbox: Outbox,
    tables: Tables,
) -> None:
    """150 rows of 1 MiB drain through a real relay process whose peak RSS stays bounded."""
    import aio_pika

    prefix = f"t{uuid.uuid4().hex[:12]}"
    queue_name = f"{prefix}-sink"
    connection = await aio_pika.connect(rabbitmq)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "postroom", aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
        await queue.bind(exchange, routing_key=f"{prefix}.#")
        large = Outbox(tables, max_payload_bytes=2 * MIB)
        for start in range(0, 150, 10):
            with Session(engine) as session:
                for i in range(start, start + 10):
                    large.enqueue(session, f"{prefix}.big", b"x" * MIB, key=f"k{i}")
                session.commit()
        relay = fleet.start(broker_url=rabbitmq)
        started = time.monotonic()
        await relay.wait_ready_async()
        deadline = time.monotonic() + 120
        while await asyncio.to_thread(_pending, engine, tables) > 0:
            assert time.monotonic() < deadline, relay.tail()
            await asyncio.sleep(0.5)
        drained = time.monotonic() - started
        peak = _peak_rss_mib(relay.pid)
        record_property("relay_peak_rss_mib", round(peak, 1))
        record_property("drain_seconds", round(drained, 1))
        declared = await channel.declare_queue(queue_name, passive=True)
        confirmed = declared.declaration_result.message_count
        assert relay.terminate() == 0
    finally:
        try:
            cleanup = await connection.channel()
            await cleanup.queue_delete(queue_name)
        finally:
            await connection.close()
    assert confirmed == 150
    assert peak < 200, f"relay peak RSS {peak:.0f} MiB"


@pytest.mark.timeout(120)
async def test_a_header_over_frame_max_is_dead_at_once_and_the_relay_keeps_its_connection(
    rabbitmq: str, fleet: RelayFleet, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """The issue's case: a 200 KB header made RabbitMQ close the relay's connection in a loop."""
    from tests.support.readback import RabbitMQReadback

    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with RabbitMQReadback(rabbitmq, f"{prefix}.#") as readback:
        with Session(engine) as session:
            before = [
                outbox.enqueue(session, f"{prefix}.t", {"n": i}, key=f"a{i}") for i in range(5)
            ]
            big = outbox.enqueue(
                session, f"{prefix}.t", {"n": "big"}, key="big", headers={"blob": "h" * 200_000}
            )
            same_key = outbox.enqueue(session, f"{prefix}.t", {"n": "after"}, key="big")
            after = [
                outbox.enqueue(session, f"{prefix}.t", {"n": i}, key=f"b{i}") for i in range(5)
            ]
            session.commit()
        relay = fleet.start(broker_url=rabbitmq)
        wanted = [str(m.id) for m in [*before, same_key, *after]]
        await readback.wait_for_ids(wanted, within=30)
        await asyncio.sleep(1)
        received = [d.id for d in readback.received]
    with engine.connect() as connection:
        row = connection.execute(
            text(
                f"SELECT status, attempts, last_error FROM {quoted_table(tables.outbox)} "
                "WHERE id = :id"
            ),
            {"id": big.id},
        ).one()
    assert row.status == "dead"
    assert row.attempts == 1
    assert "too large for the broker" in row.last_error
    assert "frame_max" in row.last_error
    assert str(big.id) not in received
    assert sorted(received) == sorted(wanted), "each other message exactly once"
    assert len(relay.events("connected")) == 1, "the relay never lost its connection"
    assert not relay.events("connection lost")
    assert relay.terminate() == 0
