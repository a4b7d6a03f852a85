"""How Kafka errors become publish outcomes (no broker needed)."""

from __future__ import annotations

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
