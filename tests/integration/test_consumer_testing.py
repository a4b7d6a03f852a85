"""postroom.testing against the real database: follow-ups, duplicates, failures, dead letters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom import testing
from postroom.config import Settings
from postroom.message import Message
from postroom.schema import Tables


def settings_for(database_url: str, tables: Tables, **overrides: Any) -> Settings:
    return Settings(
        database_url=database_url,
        schema=tables.schema or "",
        consumer_max_attempts=3,
        **overrides,
    )


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


async def test_follow_up_exists_iff_the_handlers_transaction_committed(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    consumer = postroom.Consumer("shipping", settings_for(database_url, tables))
    fail_next = [True]

    @consumer.handler("orders.paid")
    async def ship(message: postroom.Message, session: AsyncSession) -> None:
        await consumer.outbox.enqueue_async(
            session, "shipments.requested", {"order": message.payload["order"]}, key="o-1"
        )
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("warehouse is closed")

    outbox = f'"{tables.schema}".outbox'
    paid = Message.create("orders.paid", {"order": 1})

    first = await testing.deliver(consumer, paid)
    assert first.disposition is testing.Disposition.FAILED
    assert first.error == "RuntimeError: warehouse is closed"
    assert not first.acknowledged
    assert count(engine, f"SELECT count(*) FROM {outbox}") == 0

    second = await testing.deliver(consumer, paid)
    assert second.disposition is testing.Disposition.HANDLED
    assert second.acknowledged
    third = await testing.deliver(consumer, paid)
    assert third.disposition is testing.Disposition.DUPLICATE
    assert third.acknowledged

    with engine.connect() as connection:
        rows = connection.execute(text(f"SELECT topic, key, payload FROM {outbox}")).all()
    assert [(r.topic, r.key, bytes(r.payload)) for r in rows] == [
        ("shipments.requested", "o-1", b'{"order":1}')
    ]


async def test_sync_handler_with_retries_ends_dead_lettered_with_attempts(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    consumer = postroom.Consumer("ledger", settings_for(database_url, tables))
    runs: list[int] = []

    @consumer.handler("payments.made")
    def book(message: postroom.Message, session: Session) -> None:
        runs.append(1)
        session.execute(text("SELECT 1"))
        raise ValueError("unbalanced")

    report = await testing.deliver(
        consumer, Message.create("payments.made", {"amount": 5}), retries=True
    )
    assert report.disposition is testing.Disposition.DEAD_LETTERED
    assert report.attempts == 3
    assert len(runs) == 3
    assert report.dead_letter is not None
    assert report.dead_letter.topic == "ledger.dead-letter"
    assert report.dead_letter.headers["postroom-attempts"] == "3"
    assert report.dead_letter.headers["postroom-error"] == "ValueError: unbalanced"
    inbox = f'"{tables.schema}".inbox'
    assert count(engine, f"SELECT count(*) FROM {inbox}") == 0


async def test_message_without_id_or_with_bad_json_is_dead_lettered_with_the_reason(
    database_url: str, tables: Tables
) -> None:
    consumer = postroom.Consumer("audit", settings_for(database_url, tables))
    seen: list[Any] = []

    @consumer.handler("events")
    async def audit(message: postroom.Message, session: AsyncSession) -> None:
        seen.append(message)

    good = Message.create("events", {"a": 1})
    bad_json = Message(
        id=good.id,
        topic="events",
        body=b"{nope",
        content_type="application/json",
        created_at=good.created_at,
        available_at=good.created_at,
    )
    report = await testing.deliver(consumer, bad_json)
    assert report.disposition is testing.Disposition.DEAD_LETTERED
    assert report.error is not None
    assert "not valid application/json" in report.error
    assert report.acknowledged
    assert report.attempts == 1
    assert report.dead_letter is not None
    assert report.dead_letter.body == b"{nope"

    by_header = postroom.Consumer(
        "audit2", settings_for(database_url, tables, consumer_id_source="header:event-id")
    )
    by_header.handler("events")(audit)
    no_id = await testing.deliver(by_header, good)
    assert no_id.disposition is testing.Disposition.DEAD_LETTERED
    assert no_id.error is not None
    assert "no id in the event-id header" in no_id.error
    assert seen == []


async def test_typed_model_given_to_the_handler(database_url: str, tables: Tables) -> None:
    class Order:
        def __init__(self, number: int) -> None:
            self.number = number

        @classmethod
        def model_validate(cls, data: Any) -> Order:
            if not isinstance(data, dict) or "number" not in data:
                raise ValueError("number is required")
            return cls(int(data["number"]))

    consumer = postroom.Consumer("typed", settings_for(database_url, tables))
    got: list[int] = []

    @consumer.handler("orders", model=Order)
    async def take(order: Order, session: AsyncSession) -> None:
        got.append(order.number)

    ok = await testing.deliver(consumer, Message.create("orders", {"number": 7}))
    assert ok.disposition is testing.Disposition.HANDLED
    assert got == [7]
    wrong = await testing.deliver(consumer, Message.create("orders", {"nr": 7}))
    assert wrong.disposition is testing.Disposition.DEAD_LETTERED
    assert wrong.error is not None
    assert "does not fit Order" in wrong.error
