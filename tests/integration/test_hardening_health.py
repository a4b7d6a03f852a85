"""Health means "the loop is alive", not "traffic arrived": a quiet consumer stays
healthy past its health window; a consumer whose handler or receive loop is stuck turns 503."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import postroom
from postroom.brokers.memory import MemoryBroker, MemorySubscriber
from postroom.consumer import ConsumerService
from postroom.schema import Tables
from tests.support.consuming import settings_for
from tests.support.network import http_get
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

WINDOW = 1.0


def quiet_consumer(
    database_url: str, tables: Tables, port: int, release: asyncio.Event, **overrides: Any
) -> tuple[ConsumerService, MemoryBroker]:
    settings = settings_for(
        database_url, tables, metrics_port=port, **({"health_timeout": WINDOW} | overrides)
    )
    consumer = postroom.Consumer(f"c{uuid.uuid4().hex[:8]}", settings)

    @consumer.handler("t")
    async def handle(message: postroom.Message, session: Any) -> None:
        await release.wait()

    broker = MemoryBroker()
    return ConsumerService(consumer, MemorySubscriber(broker, poll_interval=5.0), settings), broker


@contextlib.asynccontextmanager
async def running(service: ConsumerService, release: asyncio.Event) -> AsyncIterator[None]:
    """Run ``service`` until ready; at the end free its handlers and stop it."""
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: service.ready, within=15)
        yield
    finally:
        release.set()
        service.stop()
        await task


async def test_an_idle_consumer_stays_healthy_past_its_health_window(
    database_url: str, tables: Tables, unused_tcp_port: int
) -> None:
    release = asyncio.Event()
    service, _ = quiet_consumer(database_url, tables, unused_tcp_port, release)
    async with running(service, release):
        await asyncio.sleep(3 * WINDOW)  # no traffic at all, the subscriber waits 5 s a poll
        assert service.healthy()
        assert await asyncio.to_thread(http_get, unused_tcp_port, "/healthz") == (200, "ok\n")


async def test_a_handler_blocked_forever_turns_the_consumer_unhealthy(
    database_url: str, tables: Tables, unused_tcp_port: int
) -> None:
    release = asyncio.Event()
    service, broker = quiet_consumer(database_url, tables, unused_tcp_port, release)
    async with running(service, release):
        await broker.publisher().publish([postroom.Message.create("t", {"n": 1})])
        await wait_until(lambda: service.processor.longest_run() > 0, within=15)
        await wait_until(lambda: not service.healthy(), within=3 * WINDOW + 6)
        assert await asyncio.to_thread(http_get, unused_tcp_port, "/healthz") == (
            503,
            "not ready\n",
        )
        release.set()
        await wait_until(service.healthy, within=3 * WINDOW + 6)


async def test_a_receive_loop_that_cannot_go_on_turns_the_consumer_unhealthy(
    database_url: str, tables: Tables, unused_tcp_port: int
) -> None:
    # One slot, one message in hand: the receive loop waits for the slot the stuck
    # handler holds, so the loop itself stops turning.
    release = asyncio.Event()
    service, broker = quiet_consumer(
        database_url,
        tables,
        unused_tcp_port,
        release,
        consumer_concurrency=1,
        consumer_prefetch=1,
    )
    async with running(service, release):
        message = postroom.Message.create
        await broker.publisher().publish([message("t", {"n": 1}), message("t", {"n": 2})])
        await wait_until(lambda: service.processor.longest_run() > 0, within=15)
        await wait_until(lambda: not service._lifecycle.turning(), within=3 * WINDOW + 6)
        assert not service.healthy()
        release.set()
        await wait_until(service._lifecycle.turning, within=3 * WINDOW + 6)
