"""The per-message path without its extra round trips: no pool pre-ping on the consumer's
engines, and no RELEASE of the handler's savepoint. What that must not change: a dropped
connection is an outage that costs no attempt, and a handler that rolls its session back
and returns still commits its inbox row with what it wrote after the rollback.

Real PostgreSQL; the memory broker's deliveries (nothing broker-specific is tested here).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom import testing
from postroom.brokers.memory import MemoryBroker, MemoryDelivery, MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.consumer.processing import Disposition
from postroom.message import Message
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.support.consuming import settings_for, unique


def _inbox_ids(engine: Engine, tables: Tables, consumer: str) -> list[str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(f"SELECT message_id FROM {quoted_table(tables.inbox)} WHERE consumer = :c"),
            {"c": consumer},
        )
        return [row[0] for row in rows]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_handler_that_rolls_back_and_returns_commits_its_inbox_row_and_later_writes(
    database_url: str, tables: Tables, engine: Engine, kind: str
) -> None:
    ledger = f'"{tables.schema}".ledger'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {ledger} (step text)"))
    consumer = postroom.Consumer(unique("rollback"), settings_for(database_url, tables))
    runs: list[str] = []

    if kind == "async":

        @consumer.handler("t")
        async def handle(message: Message, session: AsyncSession) -> None:
            runs.append(str(message.id))
            await session.execute(text(f"INSERT INTO {ledger} VALUES ('undone')"))
            await session.rollback()
            await session.execute(text(f"INSERT INTO {ledger} VALUES ('kept')"))

    else:

        @consumer.handler("t")
        def handle_sync(message: Message, session: Session) -> None:
            runs.append(str(message.id))
            session.execute(text(f"INSERT INTO {ledger} VALUES ('undone')"))
            session.rollback()
            session.execute(text(f"INSERT INTO {ledger} VALUES ('kept')"))

    message = Message.create("t", {})
    report = await testing.deliver(consumer, message)
    again = await testing.deliver(consumer, message)
    assert (report.disposition, report.acknowledged) == (Disposition.HANDLED, True)
    assert (report.attempts, report.error) == (1, None)
    assert again.disposition is Disposition.DUPLICATE
    # Its rollback took the inbox row with it (no savepoint at first): that run was undone
    # as a whole and it ran once more, under a savepoint; one attempt all the same.
    assert runs == [str(message.id)] * 2
    with engine.connect() as connection:
        steps = [row[0] for row in connection.execute(text(f"SELECT step FROM {ledger}"))]
    assert steps == ["kept"]
    assert _inbox_ids(engine, tables, consumer.name) == [str(message.id)]


async def test_consumer_engine_has_no_pre_ping_and_a_dropped_connection_costs_no_attempt(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    consumer = postroom.Consumer(unique("noping"), settings_for(database_url, tables))
    backends: list[int] = []
    runs: list[str] = []

    @consumer.handler("t")
    async def handle(message: Message, session: AsyncSession) -> None:
        backends.append((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        runs.append(str(message.id))

    subscriber = MemorySubscriber(MemoryBroker())
    subscriber.consumer = consumer.name
    service = ConsumerService(consumer, subscriber, consumer.settings)
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    processor = service.processor
    sync_engine = processor._async_engine.sync_engine
    assert sync_engine.pool._pre_ping is False
    event.listen(sync_engine, "before_cursor_execute", record)
    try:
        first = MemoryDelivery(subscriber, Message.create("t", {}), 1)
        assert (await processor.process(first)).disposition is Disposition.HANDLED
        assert not any(s.strip().lower() == "select 1" for s in statements)
        # Nor a savepoint: the handler's session joins the transaction of its inbox row.
        assert not any("savepoint" in s.lower() for s in statements)
        assert any("insert" in s.lower() for s in statements)
        # The pooled connection dies (as in a database restart); the next message finds out
        # on its first statement: an outage, tried again on a new connection, no attempt spent.
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backends[0]})
        second = MemoryDelivery(subscriber, Message.create("t", {}), 1)
        result = await processor.process(second)
    finally:
        await processor._async_engine.dispose()
    assert result.disposition is Disposition.HANDLED
    assert result.attempts == 1
    assert service.metrics.database_unavailable._value.get() == 1
    assert second.settled == "acked"
    assert len(runs) == 2
    assert backends[1] != backends[0]
    assert sorted(_inbox_ids(engine, tables, consumer.name)) == sorted(runs)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_handler_that_swallows_a_database_error_fails_and_commits_nothing(
    database_url: str, tables: Tables, engine: Engine, kind: str
) -> None:
    """The statement fails, PostgreSQL aborts the transaction, the handler catches the
    error and returns: a COMMIT would silently roll back, so the attempt must fail instead
    of being acknowledged with neither its effect nor its inbox row."""
    ledger = f'"{tables.schema}".ledger'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {ledger} (step text PRIMARY KEY)"))
        connection.execute(text(f"INSERT INTO {ledger} VALUES ('taken')"))
    consumer = postroom.Consumer(unique("swallow"), settings_for(database_url, tables))
    insert = text(f"INSERT INTO {ledger} VALUES ('taken')")

    if kind == "async":

        @consumer.handler("t")
        async def handle(message: Message, session: AsyncSession) -> None:
            with contextlib.suppress(IntegrityError):
                await session.execute(insert)

    else:

        @consumer.handler("t")
        def handle_sync(message: Message, session: Session) -> None:
            with contextlib.suppress(IntegrityError):
                session.execute(insert)

    message = Message.create("t", {})
    report = await testing.deliver(consumer, message)
    assert report.disposition is Disposition.FAILED
    assert report.acknowledged is False
    assert report.error is not None
    assert "PostgreSQL had aborted its transaction" in report.error
    assert _inbox_ids(engine, tables, consumer.name) == []
