"""CloudEvents interoperability on the real brokers, judged by the ``cloudevents`` SDK.

(a) The relay, with CloudEvents on for a topic, publishes messages the SDK decodes from what
the broker holds (Kafka binding; on RabbitMQ the AMQP binding, through RabbitMQ's mapping of
headers to application properties, and the SDK's RabbitMQ binding). (b) Messages the SDK
wrote in binary mode are handled by a postroom consumer reading ids from ``ce_id``, once.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom import Settings
from postroom.brokers import publisher_from_url
from postroom.consumer import ConsumerService
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.schema import Tables
from tests.support.consuming import RawMessage, Rig, settings_for, unique
from tests.support.database import count
from tests.support.readback import (
    Delivered,
    RabbitMQReadback,
    create_topics,
    read_kafka_to_end,
)
from tests.support.relaying import outbox_rows, relay_settings, running_relay
from tests.support.services import AMQP_URL, KAFKA_BOOTSTRAP, KAFKA_URL
from tests.support.waiting import wait_until

SOURCE = "/shop/orders"


def _write(engine: Engine, outbox: Outbox, orders: str, audit: str) -> list[postroom.Message]:
    """Three messages: two on the CloudEvents topic (one naming its own type), one not."""
    with Session(engine) as session:
        written = [
            outbox.enqueue(session, orders, {"order": 1, "total": "9.90"}, key="alice"),
            outbox.enqueue(
                session, orders, {"order": 2}, headers={"ce_type": "com.example.order.placed"}
            ),
            outbox.enqueue(session, audit, {"seen": True}),
        ]
        session.commit()
    return written


async def _relay(settings: Settings, engine: Engine, tables: Tables, broker_url: str) -> None:
    policy = settings.cloudevents_policy()
    assert policy is not None
    publisher = publisher_from_url(broker_url, cloudevents=policy)
    async with running_relay(Relay(settings, publisher)):
        await wait_until(
            lambda: all(r.status == "published" for r in outbox_rows(engine, tables)),
            within=15,
            what="every row published",
        )


def _check(event: BaseCloudEvent, message: postroom.Message, expected_type: str) -> None:
    assert event.get_id() == str(message.id)
    assert event.get_source() == SOURCE
    assert event.get_specversion() == "1.0"
    assert event.get_type() == expected_type
    assert event.get_datacontenttype() == "application/json"
    time = event.get_time()
    assert time is not None
    assert abs((time - message.created_at).total_seconds()) < 0.001
    assert event.get_data() == message.payload


def _by_id(received: list[Delivered]) -> dict[str, Delivered]:
    return {d.headers["postroom-id"]: d for d in received}


async def test_relay_publishes_cloudevents_the_sdk_reads_from_kafka(
    kafka: str, engine: Engine, outbox: Outbox, tables: Tables, database_url: str
) -> None:
    prefix = unique("ce")
    orders, audit = f"{prefix}.orders", f"{prefix}.audit"
    await asyncio.to_thread(create_topics, KAFKA_BOOTSTRAP, [orders, audit], partitions=1)
    written = _write(engine, outbox, orders, audit)
    settings = relay_settings(
        database_url, tables, cloudevents=f"{prefix}.ord*", cloudevents_source=SOURCE
    )
    await _relay(settings, engine, tables, KAFKA_URL)
    received = _by_id(
        await asyncio.to_thread(read_kafka_to_end, KAFKA_BOOTSTRAP, [orders, audit], 20)
    )
    assert set(received) == {str(m.id) for m in written}
    for message, expected_type in zip(written[:2], [orders, "com.example.order.placed"]):
        record = received[str(message.id)]
        wire = ce_kafka.KafkaMessage(
            headers={name: value.encode() for name, value in record.headers.items()},
            key=record.key,
            value=record.body,
        )
        event = ce_kafka.from_binary(wire, JSONFormat())
        _check(event, message, expected_type)
        assert record.key == message.key, "the record key stays the message key"
        assert record.headers["postroom-id"] == str(message.id), "postroom's envelope stays"
    untouched = received[str(written[2].id)].headers
    assert not [name for name in untouched if name.startswith("ce_")]
    assert "content-type" not in untouched


async def test_relay_publishes_cloudevents_the_sdk_reads_from_rabbitmq(
    rabbitmq: str, engine: Engine, outbox: Outbox, tables: Tables, database_url: str
) -> None:
    prefix = unique("ce")
    orders, audit = f"{prefix}.orders", f"{prefix}.audit"
    written = _write(engine, outbox, orders, audit)
    settings = relay_settings(
        database_url, tables, cloudevents=f"{orders},other", cloudevents_source=SOURCE
    )
    async with RabbitMQReadback(AMQP_URL, f"{prefix}.#") as readback:
        await _relay(settings, engine, tables, AMQP_URL)
        received = _by_id(await readback.wait_for(3, within=10))
    for message, expected_type in zip(written[:2], [orders, "com.example.order.placed"]):
        delivered = received[str(message.id)]
        # RabbitMQ hands AMQP 0-9-1 headers to AMQP 1.0 clients as application properties.
        as_amqp = ce_amqp.AMQPMessage(
            properties={"content-type": delivered.content_type},
            application_properties=dict(delivered.headers),
            application_data=delivered.body,
        )
        _check(ce_amqp.from_binary(as_amqp, JSONFormat()), message, expected_type)
        as_rabbitmq = ce_rabbitmq.RabbitMQMessage(
            headers=dict(delivered.headers),
            content_type=delivered.content_type,
            body=delivered.body,
        )
        _check(ce_rabbitmq.from_binary(as_rabbitmq, JSONFormat()), message, expected_type)
        assert delivered.headers["cloudEvents_id"] == str(message.id)
        assert delivered.id == str(message.id), "the AMQP message_id stays"
    untouched = received[str(written[2].id)].headers
    assert not [n for n in untouched if n.startswith(("cloudEvents", "ce-"))]


def _sdk_event(event_id: str, order: int) -> CloudEvent:
    return CloudEvent(
        attributes={
            "id": event_id,
            "type": "com.example.order.placed",
            "source": "/elsewhere",
            "time": datetime.now(UTC),
            "datacontenttype": "application/json",
        },
        data={"order": order},
    )


def _sdk_kafka(event: CloudEvent) -> RawMessage:
    wire = ce_kafka.to_binary(event, JSONFormat())
    headers = {name: value.decode() for name, value in wire.headers.items()}
    return RawMessage(wire.value, headers, key="customer-7")


def _sdk_amqp(event: CloudEvent) -> RawMessage:
    wire = ce_amqp.to_binary(event, JSONFormat())
    return RawMessage(
        wire.application_data,
        wire.application_properties,
        content_type=wire.properties["content-type"],
    )


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
async def test_consumer_handles_sdk_events_once_by_their_ce_id(
    broker: str,
    request: pytest.FixtureRequest,
    engine: Engine,
    tables: Tables,
    database_url: str,
) -> None:
    request.getfixturevalue(broker)  # the broker answers, or the test fails saying so
    rig = Rig(broker)
    name = unique("ce-consumer")
    (topic,) = await rig.topics("ce-orders", consumer=name)
    settings = settings_for(database_url, tables, consumer_id_source="cloudevents")
    consumer = postroom.Consumer(name, settings)
    effects = f'"{tables.schema}".ce_effects'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {effects} (message_id text)"))
    seen: list[dict[str, Any]] = []

    @consumer.handler(topic)
    async def record(message: postroom.Message, session: AsyncSession) -> None:
        seen.append(message.payload)
        await session.execute(text(f"INSERT INTO {effects} VALUES (:id)"), {"id": str(message.id)})

    event_id = f"order-{uuid.uuid4().hex[:8]}"
    encode = _sdk_kafka if broker == "kafka" else _sdk_amqp
    first, again = encode(_sdk_event(event_id, 7)), encode(_sdk_event(event_id, 7))
    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        await rig.publish_raw_many(topic, [first, again])
        duplicates = service.metrics.duplicates.labels(topic)
        await wait_until(lambda: duplicates._value.get() >= 1, what="the redelivery skipped")
    assert seen == [{"order": 7}]
    inbox = f'"{tables.schema}".inbox'
    ids = count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c AND message_id = :m",
                c=name, m=event_id)  # fmt: skip
    assert ids == 1, "the inbox keeps the CloudEvents id as received"
    assert count(engine, f"SELECT count(*) FROM {effects}") == 1
    assert service.metrics.handled.labels(topic)._value.get() == 1
