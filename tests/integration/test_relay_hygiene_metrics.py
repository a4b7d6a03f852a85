"""The relay's table-hygiene gauges on a live /metrics: the outbox's dead tuples and the age
of the oldest transaction holding back vacuum, as PostgreSQL's statistics views tell them,
also under the least-privileged relay role ``postroom db grants`` describes."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from postroom.brokers.memory import MemoryBroker
from postroom.outbox import Outbox
from postroom.relay import Relay, service
from postroom.schema import Tables
from postroom.schema.grants import Role, grant_statements
from postroom.urls import psycopg_conninfo
from tests.support.relaying import relay_settings, running_relay
from tests.support.waiting import wait_until

ROWS = 20


def gauges(port: int) -> dict[str, float]:
    """The unlabelled samples of a /metrics endpoint, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read().decode()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture(params=["superuser", "relay role"])
def relay_url(
    request: pytest.FixtureRequest, database_url: str, engine: Engine, tables: Tables
) -> Iterator[str]:
    """The database URL the relay runs with: the test's own, or a role with exactly the
    relay's grants (no pg_read_all_stats)."""
    if request.param == "superuser":
        yield database_url
        return
    name = f"pr_hyg_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        connection.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        for statement in grant_statements(tables, Role.RELAY, name):
            connection.execute(text(statement))
    try:
        yield make_url(database_url).set(username=name).render_as_string(hide_password=False)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP OWNED BY "{name}"'))
            connection.execute(text(f'DROP ROLE "{name}"'))


async def test_dead_tuples_and_the_oldest_transaction_age_reach_metrics(
    relay_url: str,
    engine: Engine,
    outbox: Outbox,
    tables: Tables,
    unused_tcp_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "HOUSEKEEPING_INTERVAL", 0.3)
    with Session(engine) as session:
        outbox.enqueue_many(session, [outbox.message("t", i) for i in range(ROWS)])
        session.commit()
    # Delete them before any relay publishes them: ROWS dead tuples, made visible to the
    # statistics views at once (PostgreSQL 15+ flushes them when the session goes idle).
    with engine.connect() as connection:
        connection.execute(text(f'DELETE FROM "{tables.schema}"."{tables.outbox.name}"'))
        connection.commit()
        connection.execute(text("SELECT pg_stat_force_next_flush()"))
        connection.commit()
    # A transaction of the relay's own role left open with a transaction id: it holds
    # vacuum back (its xact_start is visible to that role without pg_read_all_stats).
    holder = await psycopg.AsyncConnection.connect(psycopg_conninfo(relay_url))
    try:
        await holder.execute("SELECT pg_current_xact_id()")
        opened = time.monotonic()
        settings = relay_settings(relay_url, tables, metrics_port=unused_tcp_port)
        async with running_relay(Relay(settings, MemoryBroker().publisher())) as relay:
            await wait_until(lambda: relay.ready, within=10)

            def sampled() -> dict[str, float] | None:
                now = gauges(unused_tcp_port)
                return now if now["postroom_outbox_dead_tuples"] >= ROWS else None

            first = await wait_until(lambda: asyncio.to_thread(sampled), within=5)
            held = time.monotonic() - opened
            # Other sessions of the database may be older still: at least ours.
            age = first["postroom_database_oldest_transaction_age_seconds"]
            assert age >= held - 0.5, (age, held)
            await asyncio.sleep(1.0)
            later = await asyncio.to_thread(gauges, unused_tcp_port)
            assert later["postroom_database_oldest_transaction_age_seconds"] >= age + 0.5
    finally:
        await holder.rollback()
        await holder.close()
