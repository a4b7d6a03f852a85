"""Choosing and configuring a publisher from a URL, without any broker running."""

from __future__ import annotations

import importlib
import sys
import uuid

import pytest

from postroom.brokers import Publisher, publisher_from_url
from postroom.brokers.kafka import KafkaPublisher, parse_kafka_url
from postroom.brokers.memory import MemoryBroker, MemoryPublisher
from postroom.brokers.rabbitmq import RabbitMQPublisher
from postroom.errors import ConfigurationError, MissingExtraError


def test_amqp_urls_give_a_rabbitmq_publisher() -> None:
    publisher = publisher_from_url("amqp://guest:s3cret@rabbit:5673/orders", exchange="events")
    assert isinstance(publisher, RabbitMQPublisher)
    assert isinstance(publisher, Publisher)
    assert publisher.exchange == "events"
    assert publisher.address == "rabbit:5673 (vhost 'orders')"
    assert "s3cret" not in repr(publisher)
    secure = publisher_from_url("amqps://u:p@rabbit/")
    assert isinstance(secure, RabbitMQPublisher)
    assert secure.address == "rabbit:5671"


def test_kafka_urls_give_a_kafka_publisher() -> None:
    publisher = publisher_from_url("kafka://k1:9093,k2?linger.ms=20", message_timeout_ms=5000)
    assert isinstance(publisher, KafkaPublisher)
    assert isinstance(publisher, Publisher)
    assert publisher.bootstrap_servers == "k1:9093,k2:9092"
    assert publisher.message_timeout == 5.0


def test_memory_urls_give_the_named_in_memory_broker() -> None:
    name = f"unit-{uuid.uuid4().hex}"
    publisher = publisher_from_url(f"memory://{name}")
    assert isinstance(publisher, MemoryPublisher)
    assert publisher.broker is MemoryBroker.named(name)
    default = publisher_from_url("memory://")
    assert isinstance(default, MemoryPublisher)
    assert default.broker is MemoryBroker.named("default")
    with pytest.raises(ConfigurationError, match="no options"):
        publisher_from_url("memory://x", exchange="nope")
    MemoryBroker.forget(name)


@pytest.mark.parametrize(
    "url",
    ["redis://user:s3cret@host:6379", "user:s3cret@host:5672", "", "http://host/"],
)
def test_other_urls_name_the_accepted_forms_without_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        publisher_from_url(url)
    text = str(raised.value)
    assert "amqp://" in text
    assert "kafka://" in text
    assert "memory://" in text
    assert "s3cret" not in text


@pytest.mark.parametrize(
    ("url", "servers", "settings"),
    [
        ("kafka://localhost", "localhost:9092", {}),
        ("kafka://a:1,b:2/", "a:1,b:2", {}),
        ("kafka://[::1]:9093,[fe80::1]", "[::1]:9093,[fe80::1]:9092", {}),
        (
            "kafka://h:9092?security.protocol=SSL&client.id=x",
            "h:9092",
            {
                "security.protocol": "SSL",
                "client.id": "x",
            },
        ),
    ],
)
def test_parse_kafka_url(url: str, servers: str, settings: dict[str, str]) -> None:
    assert parse_kafka_url(url) == (servers, settings)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://h:9092", "must start with kafka://"),
        ("kafka://", "names no broker"),
        ("kafka://h:notaport", "invalid broker address"),
        ("kafka://h:70000", "invalid broker address"),
        ("kafka://h:9092/topic", "has a path"),
        ("kafka://user:s3cret@h:9092", "no user or password"),
    ],
)
def test_bad_kafka_urls(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as raised:
        parse_kafka_url(url)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"acks": 1}, "acks"),
        ({"enable.idempotence": False}, "enable.idempotence"),
        ({"message.timeout.ms": 0}, "message.timeout.ms"),
        ({"error_cb": print}, "postroom sets them"),
        ({"on_delivery": print}, "postroom sets them"),
    ],
)
def test_kafka_settings_that_break_the_promises_are_refused(
    config: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        KafkaPublisher("h:9092", config=config)


def test_kafka_settings_that_keep_the_promises_are_accepted() -> None:
    publisher = KafkaPublisher(["a:1", "b:2"], config={"acks": "-1", "message.timeout.ms": 1500})
    assert publisher.bootstrap_servers == "a:1,b:2"
    assert publisher.message_timeout == 1.5


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"exchange": ""}, "exchange name"),
        ({"exchange": "bad name"}, "exchange name"),
        ({"confirm_timeout": 0}, "confirm_timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"max_message_bytes": 0}, "max_message_bytes"),
    ],
)
def test_bad_rabbitmq_options(options: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        RabbitMQPublisher("amqp://localhost/", **options)  # type: ignore[arg-type]


def test_rabbitmq_publisher_refuses_other_schemes_without_showing_the_url() -> None:
    with pytest.raises(ConfigurationError, match="amqp://") as raised:
        RabbitMQPublisher("http://user:s3cret@host/")
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("module", "package", "extra"),
    [
        ("postroom.brokers.rabbitmq", "aio_pika", "rabbitmq"),
        ("postroom.brokers.kafka", "confluent_kafka", "kafka"),
    ],
)
def test_missing_client_library_gives_an_install_hint(
    monkeypatch: pytest.MonkeyPatch, module: str, package: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(sys.modules, module)

    with pytest.raises(MissingExtraError, match=rf"pip install 'postroom\[{extra}\]'"):
        importlib.import_module(module)
    with pytest.raises(MissingExtraError):
        publisher_from_url("amqp://h/" if extra == "rabbitmq" else "kafka://h")


def test_subscribers_share_the_publishers_url_rules() -> None:
    from postroom.brokers import subscriber_from_url
    from postroom.brokers.memory import MemoryBroker, MemorySubscriber

    subscriber = subscriber_from_url("memory://orders", prefetch=4)
    assert isinstance(subscriber, MemorySubscriber)
    another = subscriber_from_url("memory://orders", prefetch=4)
    assert isinstance(another, MemorySubscriber)
    assert another.broker is MemoryBroker.named("orders")
    with pytest.raises(ConfigurationError, match="cannot consume from") as caught:
        subscriber_from_url("redis://u:secret@h/0", prefetch=4)
    assert "secret" not in str(caught.value)
