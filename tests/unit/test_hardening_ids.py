"""Message ids are normalised before dedup; the for-consumer header is trusted on
postroom's own requeue copies only."""

from __future__ import annotations

import uuid

import pytest

from postroom.brokers.base import HEADER_FOR_CONSUMER
from postroom.consumer.decoding import is_requeue_copy
from postroom.message import HEADER_ID, normalize_id

SAME = uuid.UUID("0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b")


@pytest.mark.parametrize(
    "spelling",
    [
        str(SAME),
        str(SAME).upper(),
        "{" + str(SAME) + "}",
        "urn:uuid:" + str(SAME),
        "URN:UUID:" + str(SAME).upper(),
        SAME.hex,
        "{" + SAME.hex.upper() + "}",
    ],
)
def test_every_spelling_of_a_uuid_becomes_the_canonical_one(spelling: str) -> None:
    assert normalize_id(spelling) == str(SAME)


@pytest.mark.parametrize(
    "other",
    ["order-17", "Order-17", "0190a5c2", "x" * 36, "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b-1"],
)
def test_other_ids_are_kept_as_they_came(other: str) -> None:
    assert normalize_id(other) == other


@pytest.mark.parametrize(
    ("headers", "own"),
    [
        ({HEADER_FOR_CONSUMER: "billing", HEADER_ID: str(SAME)}, True),
        ({HEADER_FOR_CONSUMER: "billing", HEADER_ID: "ext-1"}, False),
        ({HEADER_FOR_CONSUMER: "billing"}, False),
        ({HEADER_FOR_CONSUMER: "bad name!", HEADER_ID: str(SAME)}, False),
        ({HEADER_FOR_CONSUMER: "b" * 500, HEADER_ID: str(SAME)}, False),
    ],
)
def test_only_copies_with_postroom_envelope_count_as_requeue_copies(
    headers: dict[str, str], own: bool
) -> None:
    assert is_requeue_copy(headers) is own
