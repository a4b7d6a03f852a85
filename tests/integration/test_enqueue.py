"""Promise 1, atomic write: an outbox row exists if and only if its transaction committed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from postroom import (
    InvalidMessageError,
    Message,
    NotInTransactionError,
    PayloadTooLargeError,
    SchemaMissingError,
    UnsupportedTargetError,
)
from postroom.outbox import Outbox
from postroom.schema import Tables, build_tables


def outbox_rows(engine: Engine, tables: Tables) -> list[Any]:
    """Every row of the test's outbox, in write order."""
    with engine.connect() as connection:
        return list(
            connection.execute(select(tables.outbox).order_by(tables.outbox.c.position)).all()
        )


def assert_rows_match(rows: list[Any], messages: list[Message]) -> None:
    """The rows hold exactly these messages, field by field, in this order."""
    assert [row.id for row in rows] == [m.id for m in messages]
    for row, message in zip(rows, messages, strict=True):
        assert row.topic == message.topic
        assert row.key == message.key
        assert bytes(row.payload) == message.body
        assert row.content_type == message.content_type
        assert row.headers == dict(message.headers)
        assert row.created_at == message.created_at
        assert row.available_at == message.available_at
        assert row.status == "pending"
        assert row.attempts == 0


# One runner per supported target: (name, run(work, commit)) where work receives the
# target and the Outbox method to call on it.
def run_sync_session(engine: Engine, work: Callable[..., None], commit: bool) -> None:
    with Session(engine) as session:
        work(session)
        session.commit() if commit else session.rollback()


def run_sync_connection(engine: Engine, work: Callable[..., None], commit: bool) -> None:
    with engine.connect() as connection:
        work(connection)
        connection.commit() if commit else connection.rollback()


def run_psycopg(conninfo: str, work: Callable[..., None], commit: bool) -> None:
    with psycopg.connect(conninfo) as connection:
        work(connection)
        connection.commit() if commit else connection.rollback()


async def run_async_session(engine: AsyncEngine, work: Callable[..., Any], commit: bool) -> None:
    async with AsyncSession(engine) as session:
        await work(session)
        await (session.commit() if commit else session.rollback())


async def run_async_connection(engine: AsyncEngine, work: Callable[..., Any], commit: bool) -> None:
    async with engine.connect() as connection:
        await work(connection)
        await (connection.commit() if commit else connection.rollback())


async def run_psycopg_async(conninfo: str, work: Callable[..., Any], commit: bool) -> None:
    async with await psycopg.AsyncConnection.connect(conninfo) as connection:
        await work(connection)
        await (connection.commit() if commit else connection.rollback())


SYNC_TARGETS = ["session", "connection", "psycopg"]
ASYNC_TARGETS = ["async_session", "async_connection", "psycopg_async"]


@pytest.fixture
def in_transaction(
    request: pytest.FixtureRequest, engine: Engine, conninfo: str, async_engine: AsyncEngine
) -> Callable[..., Awaitable[None]]:
    """Run work(target) (a sync kind) or work_async(target) (an async kind) in a transaction
    of the parametrized target kind, then commit or not."""
    kind = request.param
    runners: dict[str, Callable[..., Any]] = {
        "session": lambda w, c: run_sync_session(engine, w, c),
        "connection": lambda w, c: run_sync_connection(engine, w, c),
        "psycopg": lambda w, c: run_psycopg(conninfo, w, c),
        "async_session": lambda w, c: run_async_session(async_engine, w, c),
        "async_connection": lambda w, c: run_async_connection(async_engine, w, c),
        "psycopg_async": lambda w, c: run_psycopg_async(conninfo, w, c),
    }

    async def run(work: Callable[..., None], work_async: Callable[..., Any], commit: bool) -> None:
        if kind in SYNC_TARGETS:
            runners[kind](work, commit)
        else:
            await runners[kind](work_async, commit)

    return run


def make_batch(outbox: Outbox) -> list[Message]:
    return [
        outbox.message(
            "orders.created",
            {"order": i, "total": "9.99"},
            key=f"order-{i % 3}",
            headers={"trace": f"t{i}"},
        )
        for i in range(5)
    ] + [outbox.message("files.stored", b"\x00\x01\x02"), outbox.message("late", 1, delay=60)]


@pytest.mark.parametrize("in_transaction", SYNC_TARGETS + ASYNC_TARGETS, indirect=True)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_every_target_writes_exactly_the_rows_of_committed_transactions(
    in_transaction: Callable[..., Awaitable[None]],
    commit: bool,
    outbox: Outbox,
    engine: Engine,
    tables: Tables,
) -> None:
    batch = make_batch(outbox)
    written: list[Message] = []

    def work(target: Any) -> None:
        written.append(outbox.enqueue(target, "orders.created", {"single": True}, key="order-0"))
        written.extend(outbox.enqueue_many(target, batch))

    async def work_async(target: Any) -> None:
        written.append(
            await outbox.enqueue_async(target, "orders.created", {"single": True}, key="order-0")
        )
        written.extend(await outbox.enqueue_many_async(target, batch))

    await in_transaction(work, work_async, commit)
    rows = outbox_rows(engine, tables)
    if commit:
        assert_rows_match(rows, written)
    else:
        assert rows == []


def test_business_rows_and_outbox_rows_commit_or_vanish_together(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    with engine.begin() as connection:
        connection.execute(text(f'CREATE TABLE "{tables.schema}".orders (id int primary key)'))
    with Session(engine) as session:
        session.execute(text(f'INSERT INTO "{tables.schema}".orders VALUES (1)'))
        outbox.enqueue(session, "orders.created", {"id": 1})
        session.commit()

    def failing_order() -> None:
        with Session(engine) as session:
            session.execute(text(f'INSERT INTO "{tables.schema}".orders VALUES (2)'))
            outbox.enqueue(session, "orders.created", {"id": 2})
            raise RuntimeError("the business logic failed after enqueue")

    with pytest.raises(RuntimeError):
        failing_order()
    with engine.connect() as connection:
        orders = connection.execute(text(f'SELECT id FROM "{tables.schema}".orders')).scalars()
        assert list(orders) == [1]
    assert [json.loads(row.payload) for row in outbox_rows(engine, tables)] == [{"id": 1}]


def test_enqueue_many_is_one_statement(engine: Engine, outbox: Outbox, tables: Tables) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    with engine.connect() as connection:
        event.listen(connection, "before_cursor_execute", count)
        outbox.enqueue_many(connection, [outbox.message("bulk", i) for i in range(500)])
        event.remove(connection, "before_cursor_execute", count)
        connection.commit()
    assert len(statements) == 1
    assert len(outbox_rows(engine, tables)) == 500


def collect_notifications(conninfo: str, channel: str, run: Callable[[], None]) -> list[str]:
    """LISTEN on ``channel``, run the work, and return the notifications that arrived."""
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.execute(f'LISTEN "{channel}"')
        run()
        return [n.channel for n in listener.notifies(timeout=0.5)]


def test_a_transaction_notifies_the_relay_once_however_many_rows(
    engine: Engine, conninfo: str, outbox: Outbox, tables: Tables
) -> None:
    def write() -> None:
        with Session(engine) as session:
            for i in range(3):
                outbox.enqueue(session, "orders.created", i)
            outbox.enqueue_many(session, [outbox.message("bulk", i) for i in range(50)])
            session.commit()

    assert collect_notifications(conninfo, tables.notify_channel, write) == [tables.notify_channel]


def test_a_rolled_back_transaction_does_not_notify(
    engine: Engine, conninfo: str, outbox: Outbox, tables: Tables
) -> None:
    def write() -> None:
        with Session(engine) as session:
            outbox.enqueue(session, "orders.created", 1)
            session.rollback()

    assert collect_notifications(conninfo, tables.notify_channel, write) == []


def test_notify_can_be_turned_off(engine: Engine, conninfo: str, tables: Tables) -> None:
    quiet = Outbox(tables, notify=False)

    def write() -> None:
        with Session(engine) as session:
            quiet.enqueue(session, "orders.created", 1)
            session.commit()

    assert collect_notifications(conninfo, tables.notify_channel, write) == []
    assert len(outbox_rows(engine, tables)) == 1


def test_concurrent_transactions_do_not_interfere(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    committed: list[uuid.UUID] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def writer(worker: int) -> None:
        start.wait()
        for round_ in range(10):
            with Session(engine) as session:
                ids = [
                    outbox.enqueue(
                        session, "t", {"w": worker, "r": round_, "i": i}, key=f"k{worker}"
                    ).id
                    for i in range(5)
                ]
                if round_ % 3 == 0:
                    session.rollback()
                else:
                    session.commit()
                    with lock:
                        committed.extend(ids)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = outbox_rows(engine, tables)
    assert sorted(row.id for row in rows) == sorted(committed)
    assert len(committed) == 8 * 6 * 5
    for worker in range(8):
        written = [json.loads(r.payload) for r in rows if r.key == f"k{worker}"]
        assert written == sorted(written, key=lambda p: (p["r"], p["i"]))


async def test_concurrent_async_transactions_do_not_interfere(
    async_engine: AsyncEngine, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    async def writer(worker: int) -> list[uuid.UUID]:
        async with AsyncSession(async_engine) as session:
            ids = [
                (await outbox.enqueue_async(session, "t", i, key=str(worker))).id for i in range(20)
            ]
            if worker % 2:
                await session.rollback()
                return []
            await session.commit()
            return ids

    results = await asyncio.gather(*(writer(w) for w in range(5)))
    expected = sorted(i for ids in results for i in ids)
    assert sorted(row.id for row in outbox_rows(engine, tables)) == expected
    assert len(expected) == 60


BAD_CALLS: list[tuple[str, dict[str, Any], type[Exception]]] = [
    ("empty topic", {"topic": ""}, InvalidMessageError),
    ("long topic", {"topic": "t" * 300}, InvalidMessageError),
    ("header value", {"headers": {"a": 1}}, InvalidMessageError),
    ("header name", {"headers": {2: "b"}}, InvalidMessageError),
    ("unserializable", {"payload": {"when": object()}}, InvalidMessageError),
    ("too large", {"payload": b"x" * (1024 * 1024 + 1)}, PayloadTooLargeError),
]


@pytest.mark.parametrize(("name", "kwargs", "error"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_writes_nothing(
    name: str,
    kwargs: dict[str, Any],
    error: type[Exception],
    engine: Engine,
    outbox: Outbox,
    tables: Tables,
) -> None:
    arguments = {"topic": "orders.created", "payload": {"ok": 1}} | kwargs
    with Session(engine) as session:
        outbox.enqueue(session, "good.before", 1)
        with pytest.raises(error):
            outbox.enqueue(session, arguments.pop("topic"), arguments.pop("payload"), **arguments)
        outbox.enqueue(session, "good.after", 2)
        session.commit()
    assert [row.topic for row in outbox_rows(engine, tables)] == ["good.before", "good.after"]


def test_enqueue_many_refuses_a_whole_batch_with_one_bad_message(
    engine: Engine, tables: Tables
) -> None:
    small = Outbox(tables, max_payload_bytes=10)
    batch = [small.message("t", 1), Message.create("t", b"x" * 11)]
    with Session(engine) as session:
        with pytest.raises(PayloadTooLargeError):
            small.enqueue_many(session, batch)
        with pytest.raises(InvalidMessageError, match="takes Message objects"):
            small.enqueue_many(session, [{"topic": "t"}])  # type: ignore[list-item]
        session.commit()
    assert outbox_rows(engine, tables) == []


def test_autocommit_connections_are_refused(
    conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    with psycopg.connect(conninfo, autocommit=True) as connection:
        with pytest.raises(NotInTransactionError, match="autocommit"):
            outbox.enqueue(connection, "t", 1)
        with connection.transaction():
            outbox.enqueue(connection, "t", 2)
    autocommit = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    with autocommit as connection, pytest.raises(NotInTransactionError):
        outbox.enqueue(connection, "t", 3)
    assert [json.loads(row.payload) for row in outbox_rows(engine, tables)] == [2]


async def test_wrong_targets_are_refused_with_the_right_hint(
    engine: Engine, async_engine: AsyncEngine, outbox: Outbox
) -> None:
    with pytest.raises(UnsupportedTargetError, match="not the Engine"):
        outbox.enqueue(engine, "t", 1)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedTargetError, match="enqueue_async"):
        async with AsyncSession(async_engine) as session:
            outbox.enqueue(session, "t", 1)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedTargetError, match="use enqueue"), Session(engine) as sync:
        await outbox.enqueue_async(sync, "t", 1)  # type: ignore[arg-type]


def test_missing_tables_name_the_command_that_creates_them(engine: Engine) -> None:
    absent = Outbox(build_tables("pr_test_absent_schema"))
    with Session(engine) as session, pytest.raises(SchemaMissingError, match="db upgrade"):
        absent.enqueue(session, "t", 1)


def _deep(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("100k-deep payload", {"payload": _deep(100_000)}),
    ("surrogate in payload", {"payload": {"a": "\ud800"}}),
    ("surrogate in key", {"key": "\udc00"}),
    ("surrogate in topic", {"topic": "t\ud800"}),
    ("surrogate in header", {"headers": {"h": "\ud800"}}),
    ("NUL in header", {"headers": {"h": "a\x00"}}),
    ("too many headers", {"headers": {f"h{i}": "v" for i in range(1000)}}),
    ("oversized header", {"headers": {"h": "v" * (1024 * 1024)}}),
    ("infinite delay", {"delay": float("inf")}),
    ("NaN delay", {"delay": float("nan")}),
    ("huge delay", {"delay": 1e300}),
    ("NUL content type", {"payload": b"x", "content_type": "application/xml\x00"}),
    ("long content type", {"payload": b"x", "content_type": "a/" + "b" * 100_000}),
    ("NUL key", {"key": "a\x00"}),
    ("long key", {"key": "k" * 100_000}),
    ("NUL message id", {"message_id": "\x00"}),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in HOSTILE_CALLS], ids=[c[0] for c in HOSTILE_CALLS])
def test_hostile_input_leaves_the_sync_transaction_usable(
    kwargs: dict[str, Any], engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    arguments = {"topic": "orders.created", "payload": {"ok": 1}} | kwargs
    _create_orders(engine, tables)
    with Session(engine) as session:
        with pytest.raises(InvalidMessageError):
            outbox.enqueue(session, arguments.pop("topic"), arguments.pop("payload"), **arguments)
        session.execute(text(f'INSERT INTO "{tables.schema}".orders VALUES (1)'))
        outbox.enqueue(session, "good.after", {"ok": 2})
        session.commit()
    _assert_committed(engine, tables)


@pytest.mark.parametrize("kwargs", [c[1] for c in HOSTILE_CALLS], ids=[c[0] for c in HOSTILE_CALLS])
async def test_hostile_input_leaves_the_async_transaction_usable(
    kwargs: dict[str, Any],
    engine: Engine,
    async_engine: AsyncEngine,
    outbox: Outbox,
    tables: Tables,
) -> None:
    arguments = {"topic": "orders.created", "payload": {"ok": 1}} | kwargs
    _create_orders(engine, tables)
    async with AsyncSession(async_engine) as session:
        with pytest.raises(InvalidMessageError):
            await outbox.enqueue_async(
                session, arguments.pop("topic"), arguments.pop("payload"), **arguments
            )
        await session.execute(text(f'INSERT INTO "{tables.schema}".orders VALUES (1)'))
        await outbox.enqueue_async(session, "good.after", {"ok": 2})
        await session.commit()
    _assert_committed(engine, tables)


def test_hand_built_hostile_messages_are_refused_before_the_database(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    good = outbox.message("t", {"ok": 1})
    _create_orders(engine, tables)
    with Session(engine) as session:
        for bad in (
            dataclasses.replace(good, content_type="application/json\x00"),
            dataclasses.replace(good, headers={"h": "\ud800"}),
            dataclasses.replace(good, body=b"x" * (1024 * 1024 + 1)),
        ):
            with pytest.raises(InvalidMessageError):
                outbox.enqueue_many(session, [good, bad])
        session.execute(text(f'INSERT INTO "{tables.schema}".orders VALUES (1)'))
        outbox.enqueue(session, "good.after", {"ok": 2})
        session.commit()
    _assert_committed(engine, tables)


def _create_orders(engine: Engine, tables: Tables) -> None:
    with engine.begin() as connection:
        connection.execute(text(f'CREATE TABLE "{tables.schema}".orders (id int primary key)'))


def _assert_committed(engine: Engine, tables: Tables) -> None:
    with engine.connect() as connection:
        orders = connection.execute(text(f'SELECT id FROM "{tables.schema}".orders')).scalars()
        assert list(orders) == [1]
    assert [row.topic for row in outbox_rows(engine, tables)] == ["good.after"]
