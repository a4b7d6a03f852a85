"""Payload encoding: the types postroom encodes by itself, the json_default plug-in, refusals."""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pydantic
import pytest

from postroom import InvalidMessageError, Message, Outbox
from postroom.encoding import encode_json
from postroom.errors import PayloadTooDeepError, PayloadTooLargeError
from postroom.message import MAX_PAYLOAD_DEPTH


class Status(enum.Enum):
    PAID = "paid"
    NESTED = Decimal("1.50")


class Level(enum.IntEnum):
    HIGH = 3


@dataclass
class Line:
    sku: str
    price: Decimal


class Money(pydantic.BaseModel):
    amount: Decimal
    currency: str
    due: date


def body(payload: Any, **options: Any) -> Any:
    return json.loads(Message.create("t", payload, **options).body)


def test_decimal_is_an_exact_string() -> None:
    assert body({"total": Decimal("19.90")}) == {"total": "19.90"}
    assert body([Decimal("0.1") + Decimal("0.2")]) == ["0.3"]
    assert body(Decimal("123456789012345678901234567890.01")) == "123456789012345678901234567890.01"


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "sNaN"])
def test_decimal_that_is_not_a_number_is_refused(bad: str) -> None:
    with pytest.raises(
        InvalidMessageError, match=r"value at \$\.x is Decimal.*not a number JSON can carry"
    ):
        Message.create("t", {"x": Decimal(bad)})


def test_datetimes_dates_and_times_are_iso_8601() -> None:
    aware = datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)
    offset = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    naive = datetime(2026, 3, 1, 12, 30)
    assert body({"a": aware, "o": offset, "n": naive, "d": date(2026, 3, 1), "t": time(7, 5)}) == {
        "a": "2026-03-01T12:30:05.123456+00:00",
        "o": "2026-03-01T12:30:00+02:00",
        "n": "2026-03-01T12:30:00",
        "d": "2026-03-01",
        "t": "07:05:00",
    }


def test_uuid_is_its_canonical_string() -> None:
    value = uuid.UUID("0190A5C2-7A4E-7D1C-9F3B-2C4D5E6F7A8B")
    assert body({"id": value}) == {"id": "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b"}


def test_enum_is_its_value_encoded_again() -> None:
    assert body([Status.PAID, Status.NESTED, Level.HIGH]) == ["paid", "1.50", 3]


def test_dataclass_is_an_object_of_its_fields_in_order() -> None:
    encoded = Message.create("t", {"line": Line("A-1", Decimal("2.50"))}).body
    assert encoded == b'{"line":{"sku":"A-1","price":"2.50"}}'


def test_pydantic_model_is_its_json_dump() -> None:
    money = Money(amount=Decimal("10.00"), currency="EUR", due=date(2026, 1, 31))
    assert body({"money": money}) == {
        "money": {"amount": "10.00", "currency": "EUR", "due": "2026-01-31"}
    }


def test_encoding_is_deterministic() -> None:
    payload = {
        "z": Line("B", Decimal("1")),
        "a": [Status.PAID, uuid.UUID(int=5), datetime(2026, 1, 1)],
    }
    first = Message.create("t", payload).body
    assert all(Message.create("t", payload).body == first for _ in range(20))
    assert first.startswith(b'{"z":')


@pytest.mark.parametrize("values", [{1, 2}, frozenset({"a"})])
def test_sets_are_refused_because_their_order_is_undefined(values: Any) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        Message.create("t", {"tags": values})
    assert "no defined order" in str(caught.value)
    assert "sorted" in str(caught.value)
    assert "the value at $.tags has type" in str(caught.value)


def test_an_unknown_type_is_named_with_its_path() -> None:
    payload = {"order": {"lines": [Line("A", Decimal(1)), {"qty": Fraction(1, 3)}]}}
    with pytest.raises(InvalidMessageError) as caught:
        Message.create("t", payload)
    text = str(caught.value)
    assert "fractions.Fraction" in text
    assert "the value at $.order.lines[1].qty has type fractions.Fraction" in text
    assert "json_default" in text


def test_the_path_goes_through_dataclass_fields_and_odd_keys() -> None:
    @dataclass
    class Box:
        content: Any

    with pytest.raises(
        InvalidMessageError, match=r'value at \$\["odd key"\]\[0\]\.content has type object'
    ):
        Message.create("t", {"odd key": [Box(object())]})


def test_a_dict_key_that_is_not_a_str_is_refused_with_its_path() -> None:
    with pytest.raises(
        InvalidMessageError, match=r"value at \$\.by_id has a dict key that is not a str"
    ):
        Message.create("t", {"by_id": {uuid.UUID(int=1): 1}})


def test_json_default_encodes_what_postroom_does_not_know() -> None:
    def fractions_as_text(value: Any) -> Any:
        if isinstance(value, Fraction):
            return {"num": value.numerator, "den": Decimal(value.denominator)}
        raise TypeError(type(value).__name__)

    assert body({"share": Fraction(1, 3)}, json_default=fractions_as_text) == {
        "share": {"num": 1, "den": "3"}
    }
    # A type it refuses (TypeError) is still named with its path.
    with pytest.raises(InvalidMessageError, match=r"value at \$\[1\] has type object"):
        Message.create("t", [Fraction(1, 2), object()], json_default=fractions_as_text)


def test_json_default_may_take_over_sets() -> None:
    def sets_sorted(value: Any) -> Any:
        if isinstance(value, set):
            return sorted(value)
        raise TypeError(type(value).__name__)

    assert body({"tags": {"b", "a"}}, json_default=sets_sorted) == {"tags": ["a", "b"]}


def test_json_default_is_not_asked_about_types_postroom_knows() -> None:
    asked: list[Any] = []

    def spy(value: Any) -> Any:
        asked.append(value)
        raise TypeError

    assert body([Decimal("1.0"), date(2026, 1, 2)], json_default=spy) == ["1.0", "2026-01-02"]
    assert asked == []


def test_outbox_json_default_applies_to_every_message_unless_one_call_overrides() -> None:
    outbox = Outbox(json_default=lambda value: f"frac:{value}")
    assert json.loads(outbox.message("t", Fraction(1, 4)).body) == "frac:1/4"
    override = outbox.message("t", Fraction(1, 4), json_default=lambda value: float(value))
    assert json.loads(override.body) == 0.25


def test_a_json_default_that_returns_its_input_is_a_circular_reference() -> None:
    with pytest.raises(InvalidMessageError, match="circular reference"):
        Message.create("t", {"x": Fraction(1, 2)}, json_default=lambda value: value)


def test_limits_still_hold_for_converted_values() -> None:
    with pytest.raises(PayloadTooLargeError):
        Message.create("t", {"d": Decimal("1" * 2000)}, max_payload_bytes=1000)

    @dataclass
    class Node:
        child: Any

    deep: Any = None
    for _ in range(MAX_PAYLOAD_DEPTH + 1):
        deep = Node(deep)
    with pytest.raises(PayloadTooDeepError):
        Message.create("t", deep)


def test_encode_json_is_compact_and_keeps_text_as_is() -> None:
    assert (
        encode_json({"name": "Zoë", "at": date(2026, 1, 1)}) == '{"name":"Zoë","at":"2026-01-01"}'
    )
