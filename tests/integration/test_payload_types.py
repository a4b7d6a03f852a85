"""Payloads people have: Decimal, datetimes, UUIDs, enums, dataclasses and pydantic models go
through the real outbox table and come back typed in a handler annotated with a model."""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pydantic
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom import InvalidMessageError, Message, Outbox, testing
from postroom.config import Settings
from postroom.schema import Tables
from tests.support.database import count


class Status(enum.Enum):
    PAID = "paid"
    SHIPPED = "shipped"


@dataclass
class Line:
    sku: str
    price: Decimal
    quantity: int


class Customer(pydantic.BaseModel):
    id: uuid.UUID
    since: date


class LineModel(pydantic.BaseModel):
    sku: str
    price: Decimal
    quantity: int


class Order(pydantic.BaseModel):
    """What the consuming side declares: the same fields, typed again."""

    id: uuid.UUID
    total: Decimal
    status: Status
    placed_at: datetime
    delivery_window: time
    lines: list[LineModel]
    customer: Customer


ORDER_ID = uuid.UUID("0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b")
CUSTOMER_ID = uuid.UUID("11111111-2222-4333-8444-555555555555")
PLACED = datetime(2026, 3, 1, 9, 15, 30, 250000, tzinfo=UTC)


def order_payload() -> dict[str, Any]:
    return {
        "id": ORDER_ID,
        "total": Decimal("1234567.89"),
        "status": Status.PAID,
        "placed_at": PLACED,
        "delivery_window": time(14, 0),
        "lines": [Line("A-1", Decimal("0.10"), 3), Line("B-2", Decimal("1234567.59"), 1)],
        "customer": Customer(id=CUSTOMER_ID, since=date(2020, 2, 29)),
    }


def read_back(engine: Engine, tables: Tables) -> Message:
    """The one outbox row, as the relay would read it."""
    with engine.connect() as connection:
        row = (
            connection.execute(
                text(
                    "SELECT id, topic, key, payload, content_type, created_at, available_at "
                    f'FROM "{tables.schema}".outbox'
                )
            )
            .mappings()
            .one()
        )
    return Message(
        id=row["id"],
        topic=row["topic"],
        body=bytes(row["payload"]),
        content_type=row["content_type"],
        created_at=row["created_at"],
        available_at=row["available_at"],
        key=row["key"],
    )


async def test_an_order_of_python_types_is_stored_as_json_and_handled_typed(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    with Session(engine) as session, session.begin():
        written = Outbox(tables).enqueue(session, "orders.placed", order_payload(), key="o-1")

    stored = read_back(engine, tables)
    assert stored.id == written.id
    assert stored.content_type == "application/json"
    assert json.loads(stored.body) == {
        "id": "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b",
        "total": "1234567.89",
        "status": "paid",
        "placed_at": "2026-03-01T09:15:30.250000+00:00",
        "delivery_window": "14:00:00",
        "lines": [
            {"sku": "A-1", "price": "0.10", "quantity": 3},
            {"sku": "B-2", "price": "1234567.59", "quantity": 1},
        ],
        "customer": {"id": "11111111-2222-4333-8444-555555555555", "since": "2020-02-29"},
    }

    consumer = postroom.Consumer(
        "payload-types", Settings(database_url=database_url, schema=tables.schema or "")
    )
    received: list[Order] = []

    @consumer.handler("orders.placed")
    async def on_order(order: Order, session: AsyncSession) -> None:
        received.append(order)

    report = await testing.deliver(consumer, stored)
    assert report.disposition is testing.Disposition.HANDLED
    [order] = received
    assert order.id == ORDER_ID
    assert order.total == Decimal("1234567.89")
    assert sum(line.price * line.quantity for line in order.lines) == order.total
    assert order.status is Status.PAID
    assert order.placed_at == PLACED
    assert order.delivery_window == time(14, 0)
    assert order.customer.id == CUSTOMER_ID
    assert order.customer.since == date(2020, 2, 29)
    assert (
        count(
            engine,
            f'SELECT count(*) FROM "{tables.schema}".inbox WHERE consumer = :c',
            c="payload-types",
        )
        == 1
    )


def test_json_default_of_the_outbox_is_used_and_a_refusal_writes_nothing(
    tables: Tables, engine: Engine
) -> None:
    def as_ratio(value: Any) -> Any:
        if isinstance(value, Fraction):
            return f"{value.numerator}/{value.denominator}"
        raise TypeError(type(value).__name__)

    outbox = Outbox(tables, json_default=as_ratio)
    with Session(engine) as session, session.begin():
        outbox.enqueue(session, "shares", {"share": Fraction(2, 3)})
        with pytest.raises(InvalidMessageError, match=r"value at \$\.tags has type set"):
            outbox.enqueue(session, "shares", {"tags": {"a"}})
    assert json.loads(read_back(engine, tables).body) == {"share": "2/3"}
