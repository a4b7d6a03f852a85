"""The consumer's pure parts: ids, decoding, registration, retry queues and settings checks."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

import postroom
from postroom.brokers.rabbitmq import retry_queue_name, retry_tier_ms
from postroom.config import Settings
from postroom.consumer.decoding import FOREIGN_ID_NAMESPACE, IdSource, to_message
from postroom.consumer.runner import check_settings, retry_window
from postroom.errors import ConfigurationError, HandlerRegistrationError, UndecodableMessageError
from tests.support.deliveries import FakeDelivery


def test_id_sources_read_where_they_say() -> None:
    delivery: Any = FakeDelivery(
        headers={"postroom-id": "p", "ce_id": "c", "x-id": "h"}, broker_message_id="a"
    )
    assert IdSource.parse("postroom").read(delivery) == "p"
    assert IdSource.parse("amqp").read(delivery) == "a"
    assert IdSource.parse("cloudevents").read(delivery) == "c"
    assert IdSource.parse("header:x-id").read(delivery) == "h"
    with pytest.raises(ConfigurationError, match="header:<name>"):
        IdSource.parse("nope")
    with pytest.raises(UndecodableMessageError, match="no id in the postroom-id header"):
        IdSource.parse("postroom").read(FakeDelivery())


def test_foreign_ids_get_a_stable_uuid_and_headers_lose_postroom_ones() -> None:
    delivery: Any = FakeDelivery(
        headers={"postroom-content-type": "application/json", "tenant": "t1"}
    )
    message = to_message(delivery, "order-7")
    assert message.id == uuid.uuid5(FOREIGN_ID_NAMESPACE, "order-7")
    assert message.payload == {"a": 1}
    assert dict(message.headers) == {"tenant": "t1"}
    raw: Any = FakeDelivery(body=b"\x00\x01")
    assert to_message(raw, str(uuid.uuid4())).payload == b"\x00\x01"
    broken: Any = FakeDelivery(body=b"{", content_type="application/json")
    with pytest.raises(UndecodableMessageError, match="not valid application/json"):
        to_message(broken, "x")
    deep: Any = FakeDelivery(body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")
    with pytest.raises(UndecodableMessageError, match="not valid application/json"):
        to_message(deep, "x")


def test_registration_rejects_bad_names_and_second_handlers() -> None:
    with pytest.raises(HandlerRegistrationError, match="may only contain"):
        postroom.Consumer("bad name")
    consumer = postroom.Consumer("billing", Settings())

    @consumer.handler("orders.created")
    async def first(message: postroom.Message, session: Any) -> None: ...

    with pytest.raises(HandlerRegistrationError, match="already has a handler"):
        consumer.handler("orders.created")(first)
    assert consumer.topics == ["orders.created"]
    spec = consumer.handler_for("orders.created")
    assert spec is not None
    assert spec.is_async
    assert spec.model is None


def test_retry_queues_are_power_of_two_tiers() -> None:
    assert retry_tier_ms(0.001) == 16
    assert retry_tier_ms(0.2) == 256
    assert retry_tier_ms(0.256) == 256
    assert retry_tier_ms(0.257) == 512
    assert retry_queue_name("billing", 1.5) == "billing.retry.2048ms"


def test_retry_window_and_settings_checks() -> None:
    settings = Settings(
        consumer_max_attempts=4, consumer_backoff_initial=1.0, consumer_backoff_max=3.0
    )
    assert retry_window(settings) == 1.0 + 2.0 + 3.0
    with pytest.raises(ConfigurationError, match="consumer_concurrency must be at least 1"):
        check_settings(Settings(consumer_concurrency=0))
    env = Settings.from_env({"POSTROOM_INBOX_RETENTION": "2d", "POSTROOM_CONSUMER_PREFETCH": "7"})
    assert env.inbox_retention == 172800.0
    assert env.consumer_prefetch == 7
