"""How Kafka errors become publish outcomes (no broker needed)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from postroom.brokers import Outcome
from postroom.brokers.kafka import KafkaPublisher, classify_error
from postroom.message import Message

MESSAGE = Message.create("orders", {"n": 1}, key="k")


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._PURGE_QUEUE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.REQUEST_TIMED_OUT,
    ],
)
def test_transport_and_timeout_errors_are_unavailable(code: int) -> None:
    result = classify_error(KafkaError(code), MESSAGE)
    assert result.outcome is Outcome.UNAVAILABLE
    assert KafkaError(code).name() in (result.error or "")


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.POLICY_VIOLATION,
    ],
)
def test_errors_about_the_message_are_rejected(code: int) -> None:
    assert classify_error(KafkaError(code), MESSAGE).outcome is Outcome.REJECTED


def test_too_large_says_what_to_do() -> None:
    error = classify_error(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), MESSAGE).error or ""
    assert "too large" in error
    assert "reference" in error


def test_missing_topic_says_to_create_it() -> None:
    error = classify_error(KafkaError(KafkaError._UNKNOWN_TOPIC), MESSAGE).error or ""
    assert "'orders'" in error
    assert "create the topic" in error


def test_unknown_codes_follow_the_fatal_and_retriable_flags() -> None:
    code = KafkaError.INVALID_CONFIG
    assert classify_error(KafkaError(code, fatal=True), MESSAGE).outcome is Outcome.UNAVAILABLE
    assert classify_error(KafkaError(code, retriable=True), MESSAGE).outcome is Outcome.UNAVAILABLE
    assert classify_error(KafkaError(code), MESSAGE).outcome is Outcome.REJECTED


async def test_oversized_message_is_rejected_even_without_a_broker() -> None:
    publisher = KafkaPublisher("127.0.0.1:1", message_timeout_ms=500)
    results = await publisher.publish([Message.create("orders", b"x" * 1_040_000)])
    await publisher.close()
    assert results[0].outcome is Outcome.REJECTED


def test_requeue_commits_only_past_records_requeued_without_a_gap() -> None:
    from postroom.brokers import CONFIRMED, DeadLetter, PublishResult, Requeued
    from postroom.brokers.kafka import KafkaDeadLetters
    from postroom.brokers.kafka.dead_letters import _Scan

    def letter(partition: int, offset: int) -> DeadLetter:
        return DeadLetter(
            id=f"m{partition}{offset}",
            position=f"{partition}:{offset}",
            body=b"x" * 10,
            headers={"postroom-topic": "orders"},
            content_type="application/octet-stream",
            partition=partition,
            offset=offset,
        )

    class Committed:
        def __init__(self) -> None:
            self.offsets: list[tuple[str, int, int]] = []

        def commit(self, *, offsets: list[Any], asynchronous: bool) -> None:
            assert asynchronous is False
            self.offsets = [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    stream = [letter(0, 0), letter(1, 0), letter(0, 1), letter(0, 2), letter(1, 1), letter(0, 3)]
    chosen = [x for x in stream if x.position != "0:1"] + [letter(2, 5)]
    published: list[str] = []

    def publish(page: list[DeadLetter]) -> list[PublishResult]:
        published.extend(x.position for x in page)
        assert all(x.body for x in page)
        return [
            PublishResult(Outcome.REJECTED, "too big") if x.position == "1:1" else CONFIRMED
            for x in page
        ]

    kafka = Committed()
    dead_letters = KafkaDeadLetters("kafka://127.0.0.1:9092", "billing")
    report = Requeued()
    dead_letters._requeue_stream(_Scan({0: 0, 1: 0}, iter(stream), kafka), chosen, publish, report)

    assert published == ["0:0", "1:0", "0:2", "1:1", "0:3"]
    assert [x.position for x in report.requeued] == ["0:0", "1:0", "0:2", "0:3"]
    assert all(x.body == b"" and x.payload_bytes == 10 for x in report.requeued)
    assert [(x.position, why) for x, why in report.failures] == [("1:1", "too big")]
    assert [x.position for x in report.still_listed] == ["0:2", "0:3"]
    assert [x.position for x in report.holding_back] == ["0:1"]
    assert [x.position for x in report.vanished] == ["2:5"]
    topic = "billing.dead-letter"
    assert kafka.offsets == [(topic, 0, 1), (topic, 1, 1)]
