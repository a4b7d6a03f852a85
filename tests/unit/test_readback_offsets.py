"""The test suite's Kafka read-back follows each partition's offsets without a gap: a fetch
that jumps ahead (a later batch served while an earlier one is still being written) is
fetched again from the first missing offset, so a message on the broker is never reported
missing by the test's own reader."""

from __future__ import annotations

from typing import Any, NamedTuple

from tests.support.readback import _OffsetFollower


class Record:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class Seek(NamedTuple):
    topic: str
    partition: int
    offset: int


class Consumer:
    def __init__(self) -> None:
        self.seeks: list[int] = []

    def seek(self, where: Any) -> None:
        self.seeks.append(where.offset)


def follow(fetches: list[list[int]]) -> tuple[list[int], list[int]]:
    consumer = Consumer()
    follower = _OffsetFollower(consumer, Seek, [("t", 0)])
    taken = [r.offset() for fetch in fetches for r in follower.in_order([Record(o) for o in fetch])]
    return taken, consumer.seeks


def test_a_fetch_that_jumps_ahead_is_fetched_again_from_the_first_missing_offset() -> None:
    assert follow([[0, 1, 4, 5], [2, 3, 4, 5], [6]]) == ([0, 1, 2, 3, 4, 5, 6], [2])


def test_a_first_fetch_past_the_start_is_fetched_again_from_offset_zero() -> None:
    assert follow([[3, 4], [0, 1, 2, 3, 4]]) == ([0, 1, 2, 3, 4], [0])


def test_a_hole_still_there_on_the_second_fetch_is_gone_through() -> None:
    assert follow([[0, 3], [3, 4]]) == ([0, 3, 4], [1])
