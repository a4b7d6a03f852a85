"""A consumed message's correlation id comes from any producer: a hostile or oversized
one is ignored (the message's own id takes its place) and never fails the message."""

from __future__ import annotations

import pytest

from postroom.correlation import (
    MAX_CORRELATION_CHARS,
    correlation_of,
    follow_up_headers,
    handling,
)
from postroom.message import HEADER_CAUSATION_ID, HEADER_CORRELATION_ID

MESSAGE_ID = "01931b6e-0000-7000-8000-000000000001"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "c" * (MAX_CORRELATION_CHARS + 1),
        "c" * 1_000_000,
        "order\n42",
        "\x1b[31mred\x1b[0m",
        "tab\there",
    ],
)
def test_an_unusable_correlation_id_is_replaced_by_the_message_id(value: str) -> None:
    assert correlation_of({HEADER_CORRELATION_ID: value}, MESSAGE_ID) == MESSAGE_ID


def test_a_usable_correlation_id_is_kept_and_follow_ups_carry_it_only_in_the_handler() -> None:
    longest = "c" * MAX_CORRELATION_CHARS
    assert correlation_of({HEADER_CORRELATION_ID: longest}, MESSAGE_ID) == longest
    assert correlation_of({}, MESSAGE_ID) == MESSAGE_ID
    assert follow_up_headers() == {}
    with handling({HEADER_CORRELATION_ID: "checkout-7", "other": "x"}, MESSAGE_ID):
        assert follow_up_headers() == {
            HEADER_CORRELATION_ID: "checkout-7",
            HEADER_CAUSATION_ID: MESSAGE_ID,
        }
    assert follow_up_headers() == {}
