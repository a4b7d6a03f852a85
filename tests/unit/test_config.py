"""Settings: environment variables, URL checks, identifier validation, secret redaction."""

from __future__ import annotations

import pytest

from postroom import ConfigurationError, Settings
from postroom.config import format_duration, parse_duration
from postroom.database import create_engine
from postroom.errors import InvalidIdentifierError
from postroom.schema import build_tables, validate_identifier
from postroom.urls import describe_url, psycopg_conninfo, redact_url


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.schema == "postroom"
    assert settings.database_url == ""
    assert settings.shown("database_url") == {"database_url": ""}
    assert settings.max_payload_bytes == 1024 * 1024
    assert settings.notify is True


def test_there_is_no_default_database() -> None:
    settings = Settings.from_env({})
    for use in (create_engine, psycopg_conninfo, describe_url):
        with pytest.raises(ConfigurationError) as refused:
            use(settings.database_url)
        assert str(refused.value) == (
            "POSTROOM_DATABASE_URL is not set: export POSTROOM_DATABASE_URL="
            "postgresql://user:password@host:5432/dbname (or pass --database-url)"
        )
        assert refused.value.exit_code == 2


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("postgresql://h:notaport/db", "its port is not a number"),
        ("postgresql://h:70000/db", "has port 70000, not 1-65535"),
        ("postgresql://h/db?bogus=1", "query option 'bogus', which PostgreSQL's client does not"),
    ],
)
def test_database_urls_postgresql_cannot_use_are_refused(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Settings(database_url=url)
    assert Settings(database_url="postgresql://h/db?sslmode=disable&connect_timeout=3")


def test_durations_read_back_as_written() -> None:
    written = {86400.0: "24h", 604800.0: "7d", 1.0: "1s", 300.0: "5m", 60.0: "60s", 0.25: "250ms"}
    for seconds, text in written.items():
        assert format_duration(seconds) == text
        assert parse_duration(text) == seconds
    with pytest.raises(ConfigurationError, match="longer than 36500d"):
        parse_duration("99999999999d", what="--older-than")
    with pytest.raises(ConfigurationError, match="longer than 36500d"):
        Settings(relay_lease=1e300)
    with pytest.raises(ConfigurationError, match="more than 2,147,483,647"):
        Settings(relay_batch_size=10**20)


def test_every_field_reads_its_environment_variable() -> None:
    settings = Settings.from_env(
        {
            "POSTROOM_DATABASE_URL": "postgresql://u:p@db:6543/app",
            "POSTROOM_BROKER_URL": "kafka://k1:9092,k2:9092",
            "POSTROOM_SCHEMA": "messaging",
            "POSTROOM_OUTBOX_TABLE": "out",
            "POSTROOM_INBOX_TABLE": "inn",
            "POSTROOM_MAX_PAYLOAD_BYTES": "2048",
            "POSTROOM_NOTIFY": "false",
        }
    )
    assert settings.database_url == "postgresql+psycopg://u:p@db:6543/app"
    assert settings.broker_url == "kafka://k1:9092,k2:9092"
    assert (settings.schema, settings.outbox_table, settings.inbox_table) == (
        "messaging",
        "out",
        "inn",
    )
    assert settings.max_payload_bytes == 2048
    assert settings.notify is False


def test_overrides_win_over_environment() -> None:
    settings = Settings.from_env({"POSTROOM_SCHEMA": "a"}, schema="b", inbox_table=None)
    assert settings.schema == "b"
    assert settings.inbox_table == "inbox"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"POSTROOM_MAX_PAYLOAD_BYTES": "lots"}, "not a whole number"),
        ({"POSTROOM_MAX_PAYLOAD_BYTES": "0"}, "positive"),
        ({"POSTROOM_NOTIFY": "maybe"}, "not a boolean"),
        ({"POSTROOM_DATABASE_URL": "mysql://root@localhost/db"}, "not a PostgreSQL URL"),
        ({"POSTROOM_DATABASE_URL": "no url here"}, "not a URL"),
        ({"POSTROOM_DATABASE_URL": "postgresql+asyncpg://x@h/db"}, "not supported"),
        ({"POSTROOM_SCHEMA": "Robert'); DROP TABLE students;--"}, "not a valid name"),
        ({"POSTROOM_OUTBOX_TABLE": "same", "POSTROOM_INBOX_TABLE": "same"}, "different names"),
    ],
)
def test_bad_values_are_refused_clearly(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Settings.from_env(env)


def test_errors_about_urls_hide_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"POSTROOM_DATABASE_URL": "mysql://root:hunter2@localhost/db"})
    assert "hunter2" not in str(caught.value)


def test_redact_url() -> None:
    assert redact_url("amqp://guest:secret@host:5672/") == "amqp://guest:***@host:5672/"
    assert redact_url("kafka://h:1") == "kafka://h:1"


@pytest.mark.parametrize("name", ["outbox", "_x", "a1_b2", "a" * 44])
def test_valid_identifiers(name: str) -> None:
    assert validate_identifier(name, "table") == name


@pytest.mark.parametrize("name", ["", "1a", "Outbox", "a-b", "a b", 'a"b', "a" * 45, None])
def test_invalid_identifiers(name: object) -> None:
    with pytest.raises(InvalidIdentifierError):
        validate_identifier(name, "table")


def test_tables_are_named_and_quoted_as_configured() -> None:
    tables = build_tables("app_messaging", "out", "inn")
    assert tables.outbox.fullname == "app_messaging.out"
    assert tables.inbox.fullname == "app_messaging.inn"
    assert tables.version_table == "out_alembic_version"
    assert build_tables("app_messaging", "out", "inn") is tables
