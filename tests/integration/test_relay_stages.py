"""The relay's latency breakdown: postroom_relay_claim_delay_seconds (due time → claim)
and postroom_relay_publish_seconds (claim → broker confirm), per published message."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.brokers.base import Publisher, PublishResult
from postroom.brokers.memory import MemoryBroker
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.schema import Tables
from tests.support.relaying import relay_settings, running_relay
from tests.support.waiting import wait_until

CLAIM_DELAY = "postroom_relay_claim_delay_seconds"
PUBLISH = "postroom_relay_publish_seconds"
#: How long the slow broker takes to confirm a batch.
CONFIRM_SECONDS = 0.08


class SlowPublisher:
    """A publisher whose broker takes CONFIRM_SECONDS to confirm each batch."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def connect(self) -> None:
        await self.publisher.connect()

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        await asyncio.sleep(CONFIRM_SECONDS)
        return await self.publisher.publish(batch)

    async def close(self) -> None:
        await self.publisher.close()


def sample(relay: Relay, name: str, le: str | None = None) -> float:
    """A sample of the relay's registry (a bucket when ``le`` is given); 0 when absent."""
    labels = {"le": le} if le is not None else {}
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_rows_waiting_for_the_relay_and_a_slow_confirm_show_in_the_two_stages(
    database_url: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    with Session(engine) as session:
        outbox.enqueue_many(session, [outbox.message("t", {"n": i}) for i in range(10)])
        session.commit()
    await asyncio.sleep(0.6)  # committed, and no relay running yet: they wait to be claimed
    broker = MemoryBroker()
    relay = Relay(relay_settings(database_url, tables), SlowPublisher(broker.publisher()))
    async with running_relay(relay):
        await wait_until(lambda: sample(relay, f"{PUBLISH}_count") == 10, within=15)
        assert len(broker.messages()) == 10
    # Each waited at least 0.6 s for its claim, and far less than a minute.
    assert sample(relay, f"{CLAIM_DELAY}_count") == 10
    assert sample(relay, f"{CLAIM_DELAY}_bucket", "0.5") == 0
    assert sample(relay, f"{CLAIM_DELAY}_bucket", "30.0") == 10
    assert 0.6 <= sample(relay, f"{CLAIM_DELAY}_sum") / 10 < 30
    # Each took the broker's CONFIRM_SECONDS from its claim to the confirm, and not seconds.
    assert sample(relay, f"{PUBLISH}_bucket", "0.075") == 0
    assert sample(relay, f"{PUBLISH}_bucket", "2.5") == 10
    assert CONFIRM_SECONDS <= sample(relay, f"{PUBLISH}_sum") / 10 < 2.5
    # Both stages end before the delivery latency does (it is taken after the mark).
    await wait_until(
        lambda: sample(relay, "postroom_relay_delivery_latency_seconds_count") == 10, within=5
    )
    stages = sample(relay, f"{CLAIM_DELAY}_sum") + sample(relay, f"{PUBLISH}_sum")
    assert stages <= sample(relay, "postroom_relay_delivery_latency_seconds_sum")


async def test_a_delayed_message_waits_from_when_it_is_due_not_from_its_enqueue(
    database_url: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    relay = Relay(relay_settings(database_url, tables), broker.publisher())
    async with running_relay(relay):
        with Session(engine) as session:
            outbox.enqueue(session, "t", {"n": 1}, delay=timedelta(seconds=1.5))
            session.commit()
        await wait_until(lambda: sample(relay, f"{CLAIM_DELAY}_count") == 1, within=15)
        assert len(broker.messages()) == 1
    # Claimed within a few polls (0.2 s) of becoming due, though 1.5 s after its enqueue.
    assert sample(relay, f"{CLAIM_DELAY}_bucket", "1.0") == 1
    assert 0 <= sample(relay, f"{CLAIM_DELAY}_sum") < 1.0
    await wait_until(
        lambda: sample(relay, "postroom_relay_delivery_latency_seconds_count") == 1, within=5
    )
    assert sample(relay, "postroom_relay_delivery_latency_seconds_sum") >= 1.5
