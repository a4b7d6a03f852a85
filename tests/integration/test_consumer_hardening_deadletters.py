"""A dead letter that cannot be written: Kafka refuses the copy with its body (a body-less
copy with the origin is written instead), and a broker that does not take the copy at all
is retried with backoff, logged at error and counted, never skipped silently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from structlog.testing import capture_logs

import postroom
from postroom.brokers.base import (
    HEADER_ERROR,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    Outcome,
    PublishResult,
)
from postroom.brokers.kafka.subscriber import KafkaDelivery, KafkaSubscriber
from postroom.config import Settings
from postroom.consumer import Disposition, Processor
from postroom.errors import BrokerUnavailableError
from postroom.message import Message
from tests.support.deliveries import FakeDelivery


class Record:
    """A consumed Kafka record, as confluent-kafka hands it out."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 41

    def topic(self) -> str:
        return "orders"

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return self._body

    def headers(self) -> list[tuple[str, bytes]]:
        return [("trace", b"abc")]


class RefusingBodies:
    """A publisher whose broker refuses every copy that has a body (too large for it)."""

    def __init__(self) -> None:
        self.published: list[Message] = []

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        self.published.extend(batch)
        return [
            PublishResult(Outcome.REJECTED, "MSG_SIZE_TOO_LARGE: Broker: Message size too large")
            if message.body
            else PublishResult(Outcome.CONFIRMED)
            for message in batch
        ]


async def test_a_dead_letter_copy_kafka_refuses_is_written_without_its_body() -> None:
    subscriber = KafkaSubscriber("127.0.0.1:1")
    publisher = RefusingBodies()
    subscriber._publisher = publisher  # type: ignore[assignment]
    subscriber.group = "billing"
    subscriber._dead_letter_topic = "billing.dead-letter"
    delivery = KafkaDelivery(subscriber, Record(b"\xff" * 4096), epoch=1)
    await subscriber._dead_letter(delivery, "the payload is not valid application/json", 1)
    refused, written = publisher.published
    assert refused.body == b"\xff" * 4096
    assert written.body == b""
    headers = written.headers
    assert headers[HEADER_TOPIC] == "orders"
    assert (headers[HEADER_PARTITION], headers[HEADER_OFFSET]) == ("3", "41")
    assert headers[HEADER_ERROR].startswith("the payload is not valid application/json; ")
    assert "orders[3] offset 41" in headers[HEADER_ERROR]
    assert "trace" not in headers, "the original headers may be what did not fit"


class Unavailable(FakeDelivery):
    """A delivery whose dead-letter copy the broker does not take the first ``fails`` times."""

    fails = 2

    async def dead_letter(self, error: str, attempts: int) -> None:
        if self.fails:
            self.fails -= 1
            raise BrokerUnavailableError("Kafka did not confirm the dead-letter copy")
        await super().dead_letter(error, attempts)


async def test_a_dead_letter_the_broker_does_not_take_is_retried_logged_and_counted() -> None:
    settings = Settings(metrics_port=0, consumer_max_message_bytes=1024)
    consumer = postroom.Consumer("billing", settings)

    @consumer.handler("orders")
    def handle(message: postroom.Message, session: Any) -> None:
        raise AssertionError("an oversized message must not reach the handler")

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    processor = Processor(
        consumer,
        settings,
        async_engine=None,  # type: ignore[arg-type]
        sync_engine=lambda: None,  # type: ignore[arg-type,return-value]
        sleep=sleep,
    )
    delivery = Unavailable(body=b"x" * 4096, headers={"postroom-id": "abc"})
    with capture_logs() as logs:
        result = await processor.process(delivery)
    assert result.disposition is Disposition.DEAD_LETTERED
    assert delivery.settled == ["dead_letter"]
    assert delivery.body == b"", "the copy goes without the body that is too large"
    failures = [entry for entry in logs if entry["event"] == "consumer.dead_letter_failed"]
    assert [entry["log_level"] for entry in failures] == ["error", "error"]
    assert processor.metrics.dead_letter_failures._value.get() == 2
    assert len(slept) == 2
    assert slept[0] <= slept[1]
