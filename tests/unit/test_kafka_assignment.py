"""The Kafka subscriber's assignments: incremental (cooperative) rebalancing is refused up
front, and a take-over librdkafka refuses stops the consumer instead of idling in silence."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from postroom.brokers.kafka import KafkaSubscriber
from postroom.errors import BrokerUnavailableError, ConfigurationError


@pytest.mark.parametrize(
    "setting",
    [
        "partition.assignment.strategy=cooperative-sticky",
        "partition.assignment.strategy=range,cooperative-sticky",
        "group.protocol=consumer",
    ],
)
def test_incremental_rebalancing_is_refused_naming_the_setting(setting: str) -> None:
    with pytest.raises(ConfigurationError, match=setting.split("=")[0]) as raised:
        KafkaSubscriber.from_url(f"kafka://127.0.0.1:1?{setting}")
    assert "eager" in str(raised.value)


def test_eager_assignors_are_accepted() -> None:
    subscriber = KafkaSubscriber.from_url(
        "kafka://127.0.0.1:1?partition.assignment.strategy=roundrobin&group.protocol=classic"
    )
    assert subscriber.bootstrap_servers == "127.0.0.1:1"


class RefusingConsumer:
    """A consumer whose assign() librdkafka refuses; consume() serves the rebalance."""

    def __init__(self, subscriber: KafkaSubscriber) -> None:
        self.subscriber = subscriber

    def assign(self, partitions: list[Any]) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "must use incremental_assign()"))

    def resume(self, partitions: list[Any]) -> None:
        raise AssertionError("resume after a refused assign")

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.subscriber._on_assign(self, [])
        return []


def test_a_refused_take_over_stops_the_poll_loop_loudly() -> None:
    subscriber = KafkaSubscriber.from_url("kafka://127.0.0.1:1")
    subscriber._consumer = RefusingConsumer(subscriber)
    with pytest.raises(BrokerUnavailableError, match="could not be taken over"):
        asyncio.run(subscriber._poll_forever())


@pytest.mark.parametrize(
    ("url", "expected"),
    [("kafka://127.0.0.1:1", 100), ("kafka://127.0.0.1:1?fetch.wait.max.ms=700", "700")],
)
def test_the_consumer_fetch_wait_is_short_unless_the_url_sets_it(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: object
) -> None:
    """librdkafka's 500 ms stalled each partition resumed after a full prefetch."""
    configs: list[dict[str, Any]] = []

    def record_config(config: dict[str, Any]) -> None:
        configs.append(config)
        raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "recorded"))

    monkeypatch.setattr("confluent_kafka.Consumer", record_config)
    with pytest.raises(ConfigurationError, match="recorded"):
        asyncio.run(KafkaSubscriber.from_url(url).start("group", ["topic"]))
    assert configs[0]["fetch.wait.max.ms"] == expected


@pytest.mark.parametrize("value", ["abc", "-5", "99999999999", ""])
def test_a_bad_fetch_wait_in_the_url_is_refused_naming_it(value: str) -> None:
    subscriber = KafkaSubscriber.from_url(f"kafka://127.0.0.1:1?fetch.wait.max.ms={value}")
    with pytest.raises(ConfigurationError, match=r"fetch\.wait\.max\.ms") as refused:
        asyncio.run(subscriber.start("group", ["topic"]))
    assert "rejected its configuration" in str(refused.value)
