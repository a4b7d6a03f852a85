"""The relay's poison path: attempts spaced by the backoff, then ``dead``, and the key flows.

In-process on the in-memory broker, each publish of a refused row is timed. Through
``postroom relay`` processes on the real brokers: a row RabbitMQ can never route
(mandatory publish, no queue bound for its topic: the broker returns it NO_ROUTE) is
retried with the relay's backoff, each gap between its attempts kept to the nominal plan,
until ``--max-attempts``; then it is ``dead`` with the broker's answer as its error, and
its key flows again. A record over the Kafka producer's ``message.max.bytes`` can never
fit: it is dead at its first attempt, and its key flows too. The processes' attempts and
their times are read from the relay's own JSON log and from the outbox.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.backoff import Backoff
from postroom.brokers.memory import MemoryBroker
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import KafkaReadback, RabbitMQReadback, read_kafka_to_end
from tests.support.relaying import TimedPublisher, relay_settings, running_relay
from tests.support.spacing import assert_spaced, failure_times
from tests.support.waiting import stays_false, wait_until

pytestmark = pytest.mark.timeout(60)

#: Four attempts whose nominal gaps (0.4, 0.8, 1.6 s) double: a zero, constant or
#: undoubled backoff falls below the lower bound of at least one gap.
MAX_ATTEMPTS = 4
BACKOFF = Backoff(initial=0.4, maximum=2.0)
POLL_INTERVAL = 0.1
#: Beyond the nominal delay, a gap may hold one poll interval, a claim and a publish round
#: trip; anything later is a relay that waits longer than its plan.
SLACK = POLL_INTERVAL + 0.9


@pytest.fixture
def fleet(database_url: str, tables: Tables, tmp_path: Path) -> Iterator[RelayFleet]:
    """Relay processes on this test's schema; all killed at teardown."""
    assert tables.schema is not None
    with RelayFleet(database_url, schema=tables.schema, log_dir=tmp_path / "relays") as relays:
        yield relays


def start_relay(fleet: RelayFleet, broker_url: str) -> ServiceProcess:
    """A relay with a small attempt budget and backoff, so a poison row dies in seconds."""
    return fleet.start(
        broker_url=broker_url,
        poll_interval=POLL_INTERVAL,
        max_attempts=MAX_ATTEMPTS,
        backoff_initial=BACKOFF.initial,
        backoff_max=BACKOFF.maximum,
    )


def write(engine: Engine, outbox: Outbox, messages: list[Message]) -> list[Message]:
    """Commit ``messages`` in one transaction, in order."""
    with Session(engine) as session, session.begin():
        return outbox.enqueue_many(session, messages)


def row(engine: Engine, tables: Tables, message: Message) -> Any:
    """The outbox row of ``message``."""
    sql = text(
        "SELECT status, attempts, last_error, published_at, dead_lettered_at "
        f"FROM {quoted_table(tables.outbox)} WHERE id = :id"
    )
    with engine.connect() as connection:
        return connection.execute(sql, {"id": message.id}).one()


async def wait_status(engine: Engine, tables: Tables, message: Message, status: str) -> Any:
    """Wait until ``message``'s row has ``status``; return the row."""

    async def reached() -> Any:
        found = await asyncio.to_thread(row, engine, tables, message)
        return found if found.status == status else None

    return await wait_until(reached, within=20, interval=0.1, what=f"{message.id} {status}")


async def test_backoff_spaces_the_attempts(
    database_url: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    settings = relay_settings(
        database_url,
        tables,
        relay_backoff_initial=BACKOFF.initial,
        relay_backoff_max=BACKOFF.maximum,
        relay_max_attempts=MAX_ATTEMPTS,
        relay_poll_interval=POLL_INTERVAL,
    )
    broker = MemoryBroker()
    publisher = TimedPublisher(broker.publisher())
    (message,) = write(engine, outbox, [outbox.message("t", 1, key="k")])
    broker.fail_message(message.id, error="refused", times=MAX_ATTEMPTS - 1)
    async with running_relay(Relay(settings, publisher)):
        await wait_until(lambda: len(broker.messages()) == 1, within=15)
    state = row(engine, tables, message)
    assert state.status == "published"
    assert state.attempts == MAX_ATTEMPTS - 1
    assert state.last_error == "refused"
    # Every failed publish and the one that went through, each gap kept to the plan.
    times = publisher.sent[message.id]
    assert len(times) == MAX_ATTEMPTS, times
    assert_spaced(times, BACKOFF, slack=SLACK)


async def test_unroutable_rabbitmq_row_is_retried_on_the_backoff_then_dead_and_its_key_flows(
    rabbitmq: str, fleet: RelayFleet, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    routed, nowhere = f"{prefix}.ok", f"{prefix}.nowhere"
    # Only <prefix>.ok is bound: RabbitMQ returns every publish to <prefix>.nowhere.
    async with RabbitMQReadback(rabbitmq, routed) as readback:
        poison, follower, *others = write(
            engine,
            outbox,
            [
                outbox.message(nowhere, {"n": "poison"}, key="k"),
                outbox.message(routed, {"n": "follower"}, key="k"),
                *(outbox.message(routed, {"n": i}, key=f"other-{i}") for i in range(5)),
            ],
        )
        relay = start_relay(fleet, rabbitmq)
        # Other keys flow while the poison row is being retried.
        await readback.wait_for_ids([str(m.id) for m in others], within=20)
        assert str(follower.id) not in readback.ids(), "the key overtook its failing row"
        dead = await wait_status(engine, tables, poison, "dead")
        await readback.wait_for_ids([str(follower.id)], within=20)
        (later,) = write(engine, outbox, [outbox.message(routed, {"n": "later"}, key="k")])
        await readback.wait_for_ids([str(later.id)], within=20)
        received = [d.id for d in readback.received]

    assert dead.attempts == MAX_ATTEMPTS
    assert "unroutable" in dead.last_error, dead.last_error
    assert "NO_ROUTE" in dead.last_error, dead.last_error
    assert dead.published_at is None
    # The key waited for the poison row's end, then flowed in order.
    assert row(engine, tables, follower).published_at >= dead.dead_lettered_at
    assert received.index(str(follower.id)) < received.index(str(later.id))
    assert str(poison.id) not in received
    assert sorted(received) == sorted(str(m.id) for m in [follower, later, *others])

    times = failure_times(relay, str(poison.id))
    assert len(times) == MAX_ATTEMPTS, relay.tail()
    assert_spaced(times, BACKOFF, slack=SLACK)
    letters = relay.events("relay.dead_lettered")
    (letter,) = [e for e in letters if e["message_id"] == str(poison.id)]
    assert letter["attempts"] == MAX_ATTEMPTS
    assert "NO_ROUTE" in letter["error"]
    assert relay.terminate() == 0


async def test_kafka_record_over_message_max_bytes_is_dead_at_once_and_its_key_flows(
    kafka: str, fleet: RelayFleet, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    topic = f"t{uuid.uuid4().hex[:12]}.big"
    limit = 4_000
    readback = await asyncio.to_thread(KafkaReadback(kafka, [topic], partitions=2).start)
    try:
        big, follower, *others = write(
            engine,
            outbox,
            [
                outbox.message(topic, {"blob": "b" * 3 * limit}, key="k"),
                outbox.message(topic, {"n": "follower"}, key="k"),
                *(outbox.message(topic, {"n": i}, key=f"other-{i}") for i in range(5)),
            ],
        )
        relay = start_relay(fleet, f"kafka://{kafka}?message.max.bytes={limit}")
        dead = await wait_status(engine, tables, big, "dead")
        await readback.wait_for_ids([str(m.id) for m in [follower, *others]], within=20)
        (later,) = write(engine, outbox, [outbox.message(topic, {"n": "later"}, key="k")])
        await readback.wait_for_ids([str(later.id)], within=20)
        # Dead is final: the relay never tries the record again, even once the key moved on.
        await stays_false(
            lambda: len(relay.events("relay.publish_failed")) > 1,
            during=BACKOFF.nominal(1) + SLACK,
            what="a second attempt at the over-size record",
        )
        received = [d.id for d in readback.received]
    finally:
        await asyncio.to_thread(readback.close)

    assert dead.attempts == 1, "a record that can never fit is not retried"
    assert "too large for the broker" in dead.last_error, dead.last_error
    assert f"> limit {limit}" in dead.last_error, dead.last_error
    assert "message.max.bytes" in dead.last_error, dead.last_error
    assert dead.published_at is None
    assert row(engine, tables, follower).published_at >= dead.dead_lettered_at
    assert received.index(str(follower.id)) < received.index(str(later.id))
    assert sorted(received) == sorted(str(m.id) for m in [follower, later, *others])
    # The fault suite's final word on the wire, a fresh read to the end, agrees.
    reread = await asyncio.to_thread(read_kafka_to_end, kafka, [topic])
    assert sorted(d.id for d in reread) == sorted(received)
    (failed,) = relay.events("relay.publish_failed")
    assert (failed["message_id"], failed["attempt"], failed["permanent"]) == (str(big.id), 1, True)
    assert row(engine, tables, big).attempts == 1
    assert relay.terminate() == 0
