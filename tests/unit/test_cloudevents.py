"""The CloudEvents settings: off unless asked for, and a bad value refused with what to set."""

from __future__ import annotations

import pytest

from postroom import Settings
from postroom.errors import ConfigurationError


@pytest.mark.parametrize(
    ("setting", "value", "words"),
    [
        ("cloudevents", "orders created", "not a topic name or glob pattern"),
        ("cloudevents", "orders,,payments", "has an empty topic"),
        ("cloudevents_source", "  ", "not a usable CloudEvents source"),
        ("cloudevents_source", "/shop/" + "x" * 1000, "not a usable CloudEvents source"),
        ("cloudevents_source", "/shop\x1b[31m", "not a usable CloudEvents source"),
        ("cloudevents", "orders." + "x" * 250, "not a topic name or glob pattern"),
        ("cloudevents", "orders;DROP TABLE", "not a topic name or glob pattern"),
    ],
)
def test_a_bad_cloudevents_setting_is_refused_saying_what_to_set(
    setting: str, value: str, words: str
) -> None:
    env = {"POSTROOM_CLOUDEVENTS": "all", f"POSTROOM_{setting.upper()}": value}
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env(env)
    assert words in str(refused.value)
    assert "POSTROOM_CLOUDEVENTS" in str(refused.value)


def test_cloudevents_are_off_unless_asked_for() -> None:
    assert Settings.from_env({}).cloudevents_policy() is None
    policy = Settings.from_env({"POSTROOM_CLOUDEVENTS": "orders.*, payments"}).cloudevents_policy()
    assert policy is not None
    assert policy.applies_to("orders.created")
    assert policy.applies_to("payments")
    assert not policy.applies_to("payments.refunded")
    assert policy.source == "postroom"


def test_a_relay_whose_publisher_was_built_without_cloudevents_is_refused() -> None:
    from postroom.brokers.rabbitmq import RabbitMQPublisher
    from postroom.relay import Relay

    settings = Settings.from_env(
        {
            "POSTROOM_DATABASE_URL": "postgresql://postroom@127.0.0.1:5432/app",
            "POSTROOM_CLOUDEVENTS": "all",
        }
    )
    with pytest.raises(ConfigurationError) as refused:
        Relay(settings, RabbitMQPublisher("amqp://guest:guest@127.0.0.1:5672/"))
    assert "cloudevents=settings.cloudevents_policy()" in str(refused.value)
    wired = RabbitMQPublisher(
        "amqp://guest:guest@127.0.0.1:5672/", cloudevents=settings.cloudevents_policy()
    )
    assert Relay(settings, wired).publisher is wired
