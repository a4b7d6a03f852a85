"""postroom_consumer_lag_messages on a live consumer's /metrics, on each broker: above 0
while a backlog waits behind a held handler, back to 0 once it drained."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

import postroom
from postroom.brokers.memory import MemoryBroker, MemorySubscriber
from postroom.consumer import ConsumerService, runner
from postroom.message import Message
from postroom.schema import Tables
from tests.support.consuming import Rig, settings_for, unique
from tests.support.services import kafka_available, rabbitmq_available
from tests.support.waiting import wait_until

BACKLOG = 8


@pytest.fixture(params=["memory", "rabbitmq", "kafka"])
def rig(request: pytest.FixtureRequest) -> Rig:
    if request.param == "rabbitmq":
        rabbitmq_available()
    elif request.param == "kafka":
        kafka_available()
    return Rig(request.param)


def lag_series(port: int) -> dict[tuple[str, str], float]:
    """The lag gauge's samples on a /metrics endpoint, by (topic, partition)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read().decode()
    return {
        (sample.labels["topic"], sample.labels["partition"]): sample.value
        for family in text_string_to_metric_families(body)
        if family.name == "postroom_consumer_lag_messages"
        for sample in family.samples
    }


async def test_lag_counts_the_backlog_and_falls_to_zero_once_drained(
    rig: Rig,
    database_url: str,
    tables: Tables,
    unused_tcp_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "LAG_SAMPLE_INTERVAL", 0.2)
    name = unique("lag")
    (topic,) = await rig.topics("orders", consumer=name)
    settings = settings_for(
        database_url,
        tables,
        metrics_port=unused_tcp_port,
        consumer_prefetch=2,
        consumer_concurrency=1,
    )
    consumer = postroom.Consumer(name, settings)
    gate = asyncio.Event()
    handled: list[object] = []

    @consumer.handler(topic)
    async def held(message: postroom.Message, session: AsyncSession) -> None:
        await gate.wait()
        handled.append(message.payload)

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        await rig.publish([Message.create(topic, {"n": n}, key="k") for n in range(BACKLOG)])

        def waiting() -> float | None:
            total = sum(lag_series(unused_tcp_port).values())
            return total if total > 0 else None

        backlog = await wait_until(
            lambda: asyncio.to_thread(waiting), within=10, what="a lag above 0"
        )
        assert backlog <= BACKLOG
        series = await asyncio.to_thread(lag_series, unused_tcp_port)
        if rig.kind == "kafka":
            # Per assigned partition of the handled topic; nothing is acknowledged yet.
            assert {t for t, _ in series} == {topic}
            assert all(p.isdigit() for _, p in series)
            assert backlog == BACKLOG
        else:
            # The consumer's queue, without partitions.
            assert set(series) == {(name, "")}
        gate.set()
        await wait_until(lambda: len(handled) == BACKLOG, within=10, what="the backlog handled")
        drained = await wait_until(
            lambda: asyncio.to_thread(lambda: sum(lag_series(unused_tcp_port).values()) == 0),
            within=5,
            what="the lag back to 0",
        )
        assert drained


class UntellingSubscriber(MemorySubscriber):
    """A memory subscriber whose broker cannot tell its lag the first ``failures`` times."""

    def __init__(self, broker: MemoryBroker, failures: int) -> None:
        super().__init__(broker)
        self.failures = failures

    async def lag(self) -> dict[tuple[str, int | None], int]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("queue statistics unavailable")
        return await super().lag()


async def test_a_lag_that_cannot_be_told_is_logged_once_and_handling_goes_on(
    database_url: str, tables: Tables, unused_tcp_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "LAG_SAMPLE_INTERVAL", 0.05)
    name, topic = unique("lag-fails"), unique("orders")
    settings = settings_for(database_url, tables, metrics_port=unused_tcp_port)
    consumer = postroom.Consumer(name, settings)
    handled: list[object] = []

    @consumer.handler(topic)
    async def record(message: postroom.Message, session: AsyncSession) -> None:
        handled.append(message.payload)

    broker = MemoryBroker()
    subscriber = UntellingSubscriber(broker, failures=5)
    service = ConsumerService(consumer, subscriber, settings)
    with capture_logs() as logs:
        async with Rig("memory").running(service, name):
            await broker.publisher().publish([Message.create(topic, {"n": 1})])
            await wait_until(lambda: handled == [{"n": 1}], within=5, what="the message handled")
            lag = await wait_until(
                lambda: asyncio.to_thread(lambda: lag_series(unused_tcp_port) or None),
                within=5,
                what="a lag sample once the broker tells it",
            )
    assert lag == {(name, ""): 0.0}
    failed = [e for e in logs if e["event"] == "consumer.lag_sample_failed"]
    assert len(failed) == 1, failed
    assert "queue statistics unavailable" in failed[0]["error"]
