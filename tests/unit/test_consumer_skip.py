"""A requeued dead letter meant for another consumer is acknowledged, not handled."""

from __future__ import annotations

from typing import Any

import postroom
from postroom.brokers.base import HEADER_FOR_CONSUMER
from postroom.config import Settings
from postroom.consumer import Disposition, Processor
from tests.support.deliveries import FakeDelivery


def _processor(name: str) -> tuple[Processor, list[Any]]:
    consumer = postroom.Consumer(name, Settings(metrics_port=0))
    ran: list[Any] = []

    @consumer.handler("orders")
    def handle(message: postroom.Message, session: Any) -> None:
        ran.append(message)

    def no_engine() -> Any:
        raise AssertionError("a skipped delivery must not touch the database")

    processor = Processor(
        consumer,
        consumer.settings,
        async_engine=None,  # type: ignore[arg-type]
        sync_engine=no_engine,
    )
    return processor, ran


async def test_a_copy_for_another_consumer_is_acknowledged_without_handling() -> None:
    processor, ran = _processor("billing")
    delivery = FakeDelivery(
        redeliverable=False,
        headers={"postroom-id": "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b", HEADER_FOR_CONSUMER: "x"},
    )
    result = await processor.process(delivery)
    assert result.disposition is Disposition.SKIPPED
    assert delivery.settled == ["ack"]
    assert ran == []
    assert processor.metrics.skipped.labels("orders")._value.get() == 1
    assert processor.metrics.handled.labels("orders")._value.get() == 0
