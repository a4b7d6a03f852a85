"""Publishing a batch in rounds so each key's messages keep their order."""

from __future__ import annotations

import pytest

from postroom.backoff import Backoff
from postroom.brokers.base import Outcome
from postroom.brokers.memory import MemoryBroker
from postroom.message import Message
from postroom.relay.batches import Batches
from postroom.relay.ordering import publish_in_key_order, rounds_by_key
from postroom.relay.store import Claim


def batch(*keys: str | None) -> list[Message]:
    return [Message.create("t", i, key=key) for i, key in enumerate(keys)]


def test_rounds_hold_each_keys_nth_message() -> None:
    messages = batch("a", "b", "a", None, "a", "b", None)
    assert rounds_by_key(messages) == [[0, 1, 3, 6], [2, 5], [4]]


def test_distinct_keys_go_in_one_round() -> None:
    assert rounds_by_key(batch("a", "b", "c")) == [[0, 1, 2]]
    assert rounds_by_key([]) == []


async def test_a_failed_message_holds_back_the_rest_of_its_key() -> None:
    broker = MemoryBroker()
    messages = batch("a", "b", "a", "b", "a")
    broker.fail_message(messages[0].id, error="no route")
    results = await publish_in_key_order(broker.publisher(), messages)
    assert results[0] is not None
    assert results[0].outcome is Outcome.REJECTED
    assert results[2] is None
    assert results[4] is None
    assert [r.outcome if r else None for r in (results[1], results[3])] == [
        Outcome.CONFIRMED,
        Outcome.CONFIRMED,
    ]
    assert [m.id for m in broker.messages()] == [messages[1].id, messages[3].id]


async def test_an_outage_holds_back_every_later_round() -> None:
    broker = MemoryBroker()
    messages = batch("a", "a", None)
    publisher = broker.publisher()
    broker.start_outage()
    results = await publish_in_key_order(publisher, messages)
    assert [r.outcome if r else None for r in results] == [
        Outcome.UNAVAILABLE,
        None,
        Outcome.UNAVAILABLE,
    ]
    assert broker.messages() == []


async def test_publishing_stops_when_the_lease_runs_low() -> None:
    broker = MemoryBroker()
    messages = batch("a", "a", "a")
    calls = iter([True, False])
    results = await publish_in_key_order(broker.publisher(), messages, lambda: next(calls))
    assert results[0] is not None
    assert results[1:] == [None, None]
    assert len(broker.messages()) == 1


async def test_an_earlier_batchs_failure_holds_back_only_the_later_rows_of_its_key() -> None:
    broker = MemoryBroker()
    messages = batch("a", "b", "a", "c")
    results = await publish_in_key_order(
        broker.publisher(),
        messages,
        stalled_keys={"a": 15, "b": 5},
        positions=[10, 11, 20, 21],
    )
    # "a" at 10 comes before the unconfirmed 15 and goes; "a" at 20 and "b" at 11 wait.
    assert [r.outcome if r else None for r in results] == [
        Outcome.CONFIRMED,
        None,
        None,
        Outcome.CONFIRMED,
    ]
    assert [m.id for m in broker.messages()] == [messages[0].id, messages[3].id]


async def test_without_positions_a_stalled_key_is_held_back_whole() -> None:
    broker = MemoryBroker()
    messages = batch("a", "b")
    results = await publish_in_key_order(broker.publisher(), messages, stalled_keys={"a": 0})
    assert results[0] is None
    assert results[1] is not None


def test_batches_keep_each_keys_first_unconfirmed_position() -> None:
    batches = Batches()
    first = batches.claimed(Claim(rows=[], tokens={}))
    second = batches.claimed(Claim(rows=[], tokens={}))
    batches.published(first, {"a": 30, "b": 4})
    batches.published(second, {"a": 12})
    assert batches.stalled_keys(frozenset({first, second})) == {"a": 12, "b": 4}
    assert batches.stalled_keys(frozenset({first})) == {"a": 30, "b": 4}


@pytest.mark.parametrize("attempt", range(1, 15))
def test_backoff_doubles_within_jitter_and_is_capped(attempt: int) -> None:
    backoff = Backoff(initial=1.0, maximum=60.0)
    nominal = min(60.0, 2.0 ** (attempt - 1))
    delays = [backoff.delay(attempt) for _ in range(200)]
    assert all(nominal / 2 <= d <= nominal for d in delays)
    assert max(delays) - min(delays) > 0


def test_backoff_survives_any_number_of_attempts() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    assert 15.0 <= backoff.delay(10_000) <= 30.0
