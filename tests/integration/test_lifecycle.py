"""The one lifecycle of the relay and the consumer: probes, stop on SIGTERM, shutdown order,
a background loop that ends, and the bounded purge, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

import postroom
from postroom.brokers.memory import MemoryBroker, MemorySubscriber
from postroom.config import Settings
from postroom.consumer import ConsumerService
from postroom.errors import ConfigurationError
from postroom.lifecycle import Lifecycle, purge_round, run_until_signalled
from postroom.relay import Relay
from postroom.relay.store import Connection, OutboxStore
from postroom.schema import Tables
from postroom.schema.inbox_sql import purge_inbox_sql
from postroom.urls import psycopg_conninfo
from tests.support.consuming import settings_for as consumer_settings
from tests.support.network import http_get
from tests.support.waiting import wait_until


def execute(engine: Engine, *statements: str) -> None:
    """Run ``statements`` in one transaction."""
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def settings_for(database_url: str, tables: Tables, **overrides: Any) -> Settings:
    """The consumer tests' settings, with the relay's short lease and poll interval."""
    return consumer_settings(
        database_url, tables, relay_lease=2.0, relay_poll_interval=0.2, **overrides
    )


def relay_service(settings: Settings) -> Relay:
    return Relay(settings, MemoryBroker().publisher())


def consumer_service(settings: Settings) -> ConsumerService:
    consumer = postroom.Consumer(f"c{uuid.uuid4().hex[:8]}", settings)

    @consumer.handler("t")
    async def handle(message: postroom.Message, session: Any) -> None:
        return None

    return ConsumerService(consumer, MemorySubscriber(MemoryBroker()), settings)


SERVICES: dict[str, Callable[[Settings], Relay | ConsumerService]] = {
    "relay": relay_service,
    "consumer": consumer_service,
}


@pytest.mark.parametrize("kind", sorted(SERVICES))
async def test_each_service_answers_its_probes_and_closes_them_on_stop(
    kind: str, database_url: str, tables: Tables, unused_tcp_port: int
) -> None:
    port = unused_tcp_port
    service = SERVICES[kind](settings_for(database_url, tables, metrics_port=port))
    task = asyncio.create_task(service.run())
    await wait_until(lambda: service.ready, within=15)
    assert await asyncio.to_thread(http_get, port, "/readyz") == (200, "ok\n")
    assert await asyncio.to_thread(http_get, port, "/healthz") == (200, "ok\n")
    status, body = await asyncio.to_thread(http_get, port, "/metrics")
    assert status == 200
    assert f"postroom_{kind}_" in body
    service.stop()
    await asyncio.wait_for(task, 15)
    assert await asyncio.to_thread(http_get, port, "/readyz") == (0, "")


@pytest.mark.parametrize("kind", sorted(SERVICES))
async def test_each_service_stops_cleanly_on_sigterm(
    kind: str, database_url: str, tables: Tables
) -> None:
    service = SERVICES[kind](settings_for(database_url, tables))
    task = asyncio.create_task(run_until_signalled(service))
    await wait_until(lambda: service.ready, within=15)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 15)  # returned, without an error
    assert not service.ready


@pytest.mark.parametrize("kind", sorted(SERVICES))
async def test_a_taken_port_is_a_configuration_error_before_any_work(
    kind: str, database_url: str, tables: Tables
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # the services bind every interface
        taken.listen()
        port = taken.getsockname()[1]
        service = SERVICES[kind](settings_for(database_url, tables, metrics_port=port))
        with pytest.raises(ConfigurationError, match=f"port {port}"):
            await asyncio.wait_for(service.run(), 15)
    assert not service.ready


async def test_shutdown_runs_in_one_order_and_a_background_loop_that_ends_stops_the_service() -> (
    None
):
    steps: list[str] = []
    lifecycle = Lifecycle(
        "test",
        CollectorRegistry(),
        metrics_port=0,
        healthy=lambda: True,
        ready=lambda: True,
        identity={},
        on_stop=lambda: steps.append("on_stop"),
    )

    async def work() -> None:
        await lifecycle.stopping.wait()
        steps.append("work returned")

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            steps.append("background cancelled")

    async def ends() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("the loop broke")

    async def drain() -> None:
        steps.append("drained")

    async def close() -> None:
        steps.append("closed")

    with pytest.raises(ValueError, match="the loop broke"):
        await asyncio.wait_for(
            lifecycle.run(
                work,
                background=[("forever", forever), ("ends", ends)],
                drain=drain,
                close=close,
            ),
            5,
        )
    assert steps == ["on_stop", "work returned", "drained", "background cancelled", "closed"]


async def test_the_purge_deletes_inbox_rows_in_bounded_rounds(
    engine: Engine, async_engine: Any, tables: Tables
) -> None:
    inbox = f'"{tables.schema}".inbox'
    execute(
        engine,
        f"INSERT INTO {inbox} (consumer, message_id, processed_at) "
        "SELECT c, c || i, now() - make_interval(hours => h) FROM "
        "(VALUES ('old', 2), ('new', 0)) AS a(c, h), generate_series(1, 25) AS i",
        f"INSERT INTO {inbox} (consumer, message_id) VALUES ('old', 'recent')",
    )
    sql = text(purge_inbox_sql(tables))

    async def delete(limit: int) -> int:
        async with async_engine.begin() as connection:
            result = await connection.execute(
                sql, {"consumer": "old", "retention": 3600.0, "limit": limit}
            )
        return int(result.rowcount or 0)

    seen: list[int] = []
    assert await purge_round(delete, batch=10, batches=2, on_deleted=seen.append) == 20
    assert seen == [10, 10]  # bounded: two statements of ten, five rows left for next round
    assert await purge_round(delete, batch=10, batches=2, on_deleted=seen.append) == 5
    assert await purge_round(delete, batch=10, batches=2) == 0
    with engine.connect() as connection:
        left = connection.execute(
            text(f"SELECT consumer, count(*) FROM {inbox} GROUP BY consumer ORDER BY consumer")
        ).all()
    assert [tuple(row) for row in left] == [("new", 25), ("old", 1)]


async def test_the_purge_deletes_published_outbox_rows_through_the_same_round(
    engine: Engine, database_url: str, tables: Tables
) -> None:
    execute(
        engine,
        f'INSERT INTO "{tables.schema}".outbox (id, topic, partition, payload, content_type, '
        "created_at, available_at, status, published_at) "
        "SELECT gen_random_uuid(), 't', 0, '\\x00', 'application/json', now(), now(), "
        "'published', now() - interval '2 hours' FROM generate_series(1, 12)",
    )
    connection_ = Connection(psycopg_conninfo(database_url), database_url)
    store = OutboxStore(connection_, tables)
    try:
        deleted = await purge_round(
            lambda limit: store.purge_published(3600, limit=limit), batch=5, batches=2
        )
        assert deleted == 10
        assert await purge_round(lambda limit: store.purge_published(3600, limit=limit)) == 2
    finally:
        await connection_.close()
