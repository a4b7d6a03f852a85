"""One redaction routine: passwords and secret query values never leave in text."""

from __future__ import annotations

import psycopg
import pytest
import structlog

from postroom.config import Settings
from postroom.database import translate
from postroom.errors import ConfigurationError
from postroom.urls import HIDDEN, normalize_database_url, redact_settings, redact_url, scrub

SECRETS = ("hunter2", "keypass77", "tokval99", "saslpw55", "ssl.pass", "gu@st")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:hunter2@h:5672/vh", "amqp://guest:***@h:5672/vh"),
        ("amqp://guest:gu%40st@h/?heartbeat=5", "amqp://guest:***@h/?heartbeat=5"),
        (
            "kafka://h1:9092,h2:9092?sasl.password=saslpw55&ssl.key.password=keypass77"
            "&token=tokval99&acks=all",
            "kafka://h1:9092,h2:9092?sasl.password=***&ssl.key.password=***&token=***&acks=all",
        ),
        (
            "kafka://h:9092?SASL.USERNAME=bob&Api_Key=hunter2",
            "kafka://h:9092?SASL.USERNAME=***&Api_Key=***",
        ),
        (
            "postgresql+psycopg://u:hunter2@h/db?sslpassword=keypass77&application_name=a",
            "postgresql+psycopg://u:***@h/db?sslpassword=***&application_name=a",
        ),
        ("amqp://h/", "amqp://h/"),
    ],
)
def test_urls_lose_their_passwords_and_secret_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "text",
    [
        "u:hunter2@host/db",
        "host=db password=hunter2",
        "postgresql://u:hunter2@[::1/db",
        "hunter2",
        "//u:hunter2@h/db",
    ],
)
def test_what_does_not_parse_is_never_echoed(text: str) -> None:
    assert "hunter2" not in redact_url(text)


@pytest.mark.parametrize(
    "url",
    [
        "u:hunter2@host/db",
        "host=db password=hunter2",
        "postgresql://u:hunter2@host:abc/db",
        "postgresql://u:hunter2@[::1/db",
        "mysql://u:hunter2@h/db",
        "postgresql+asyncpg://u:hunter2@h/db",
    ],
)
def test_bad_database_urls_are_refused_without_their_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        normalize_database_url(url)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigurationError) as caught:
        Settings(database_url=url)
    assert "hunter2" not in str(caught.value)


def test_settings_print_and_dump_without_secrets() -> None:
    settings = Settings(
        database_url="postgresql://u:hunter2@h/db?sslpassword=keypass77",
        broker_url="kafka://h:9092?sasl.password=saslpw55&token=tokval99",
    )
    for text in (repr(settings), str(settings), str(settings.shown())):
        for secret in SECRETS:
            assert secret not in text
    assert settings.shown("broker_url") == {
        "broker_url": "kafka://h:9092?sasl.password=***&token=***"
    }
    assert redact_settings({"sasl_password": "x", "port": 1}) == {
        "sasl_password": HIDDEN,
        "port": 1,
    }


def test_driver_errors_are_scrubbed_of_the_urls_secrets() -> None:
    url = "postgresql+psycopg://u:hunter2@h/db?sslpassword=keypass77"
    said = 'invalid dsn: missing "=" after "hunter2" and keypass77'
    assert "hunter2" not in scrub(said, url)
    assert "keypass77" not in scrub(said, url)
    error = translate(psycopg.OperationalError(said), url, always=True)
    assert "hunter2" not in str(error)
    assert "keypass77" not in str(error)


def test_log_lines_of_settings_hold_no_secret() -> None:
    settings = Settings(broker_url="amqp://guest:hunter2@h/?token=tokval99")
    with structlog.testing.capture_logs() as logs:
        structlog.get_logger("t").info("relay.configured", **settings.shown("broker_url"))
    assert "hunter2" not in str(logs)
    assert "tokval99" not in str(logs)
