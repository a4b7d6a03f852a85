"""A Kafka fetch that jumps past records is fetched again before anything past the hole is
handed out (a broker answering with a later batch while an earlier one is still being
written would otherwise be committed past for good).

The record stream is scripted: a broker that answers one fetch with a hole cannot be made
to do so on demand, so a stand-in consumer plays the fetches and records the seeks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from postroom.brokers.kafka import KafkaSubscriber

TOPIC = "orders"


class Record:
    """What confluent-kafka's consume() returns for one record, reduced to what is read."""

    def __init__(self, offset: int) -> None:
        self._offset = offset

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> list[tuple[str, bytes]]:
        return []


class ScriptedConsumer:
    """Answers each consume() with the next scripted fetch; notes every seek."""

    def __init__(self, subscriber: KafkaSubscriber, fetches: list[list[int]]) -> None:
        self._subscriber = subscriber
        self._fetches = fetches
        self.seeks: list[int] = []

    def consume(self, num_messages: int, timeout: float) -> list[Record]:
        if not self._fetches:
            self._subscriber._consumer = None  # ends the poll loop
            return []
        return [Record(offset) for offset in self._fetches.pop(0)]

    def seek(self, partition: Any) -> None:
        self.seeks.append(partition.offset)


def handed_out(fetches: list[list[int]]) -> tuple[list[int], list[int]]:
    """The offsets the subscriber hands out for ``fetches``, and where it sought back to."""
    subscriber = KafkaSubscriber.from_url("kafka://127.0.0.1:1", prefetch=100)
    consumer = ScriptedConsumer(subscriber, fetches)
    subscriber._consumer = consumer
    subscriber._assigned.add((TOPIC, 0))
    subscriber.idle_poll_interval = 0
    asyncio.run(subscriber._poll_forever())
    offsets = []
    while not subscriber._queue.empty():
        offsets.append(subscriber._queue.get_nowait().offset)
    return offsets, consumer.seeks


def test_a_hole_is_fetched_again_and_filled_in_order() -> None:
    offsets, seeks = handed_out([[0, 1, 2, 5, 6], [3, 4, 5, 6]])
    assert offsets == [0, 1, 2, 3, 4, 5, 6]
    assert seeks == [3]


def test_a_hole_still_there_on_the_second_fetch_is_gone_through_once() -> None:
    offsets, seeks = handed_out([[0, 1, 5, 6], [5, 6, 7], [9]])
    # 2-4 are not there on the second fetch either (compacted, or transaction markers):
    # 5 onwards is handed out; the next jump (8) is fetched again once more.
    assert offsets[:5] == [0, 1, 5, 6, 7]
    assert seeks == [2, 8]


def test_records_in_order_are_never_fetched_again() -> None:
    offsets, seeks = handed_out([[0, 1, 2], [3, 4], [5]])
    assert offsets == [0, 1, 2, 3, 4, 5]
    assert seeks == []


def test_a_failed_seek_hands_the_records_out_as_they_came() -> None:
    subscriber = KafkaSubscriber.from_url("kafka://127.0.0.1:1", prefetch=100)

    class Unseekable(ScriptedConsumer):
        def seek(self, partition: Any) -> None:
            raise RuntimeError("consumer closed")

    consumer = Unseekable(subscriber, [[0, 1, 5, 6], [7]])
    subscriber._consumer = consumer
    subscriber._assigned.add((TOPIC, 0))
    subscriber.idle_poll_interval = 0
    asyncio.run(subscriber._poll_forever())
    offsets = []
    while not subscriber._queue.empty():
        offsets.append(subscriber._queue.get_nowait().offset)
    # Nothing dropped that no second fetch would bring back.
    assert offsets == [0, 1, 5, 6, 7]


class BrokenConsumer:
    """A consumer whose consume() fails with something the poll loop does not expect."""

    def consume(self, num_messages: int, timeout: float) -> list[Record]:
        raise ValueError("something unforeseen")


def test_a_poll_loop_that_died_is_raised_by_deliveries_not_waited_on_for_ever() -> None:
    async def scenario() -> None:
        subscriber = KafkaSubscriber.from_url("kafka://127.0.0.1:1", prefetch=100)
        subscriber._consumer = BrokenConsumer()
        subscriber._poller = asyncio.create_task(subscriber._poll_forever())
        with pytest.raises(ValueError, match="something unforeseen"):
            await asyncio.wait_for(anext(subscriber.deliveries()), 5)

    asyncio.run(scenario())
