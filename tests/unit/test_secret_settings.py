"""Secrets in broker URLs and Kafka settings: redacted everywhere, and given outside the URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.brokers.kafka.settings import parse_kafka_url, settings_from_environment
from postroom.errors import ConfigurationError
from postroom.urls import redact_query_value, redact_text, redact_url


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "sasl.password",
        "sasl.oauthbearer.config",
        "ssl.key.password",
        "ssl.keystore.password",
        "api_key",
        "TOKEN",
        "client_secret",
    ],
)
def test_secret_looking_query_values_are_hidden(name: str) -> None:
    url = f"kafka://h:9092?{name}=hunter2&security.protocol=SASL_SSL"
    assert "hunter2" not in redact_url(url)
    assert f"{name}=***" in redact_url(url)
    assert "security.protocol=SASL_SSL" in redact_url(url)
    assert redact_query_value(name, "hunter2") == "***"


def test_public_settings_and_urls_without_secrets_are_unchanged() -> None:
    url = "kafka://h:9092?sasl.mechanism=PLAIN&sasl.username=bob&acks=all"
    assert redact_url(url) == url
    assert redact_url("amqp://u:p@h/v") == "amqp://u:***@h/v"
    assert redact_text("at amqp://u:pw@h/ and kafka://h?sasl.password=x.") == (
        "at amqp://u:***@h/ and kafka://h?sasl.password=***"
    )


def test_kafka_settings_from_file_environment_and_url_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "client.properties"
    config.write_text("# comment\n\nsasl.username = from-file\nsasl.password=file-pw\nacks=all\n")
    env = {
        "POSTROOM_KAFKA_CONFIG_FILE": str(config),
        "POSTROOM_KAFKA_SASL_PASSWORD": "env-pw",
        "POSTROOM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "POSTROOM_OTHER": "ignored",
    }
    assert settings_from_environment(env) == {
        "sasl.username": "from-file",
        "sasl.password": "env-pw",
        "acks": "all",
        "security.protocol": "SASL_SSL",
    }
    servers, settings = parse_kafka_url("kafka://h:1?sasl.username=from-url", env)
    assert servers == "h:1"
    assert settings["sasl.username"] == "from-url"
    assert settings["sasl.password"] == "env-pw"


def test_a_bad_config_file_is_a_sentence_without_its_content(tmp_path: Path) -> None:
    config = tmp_path / "client.properties"
    config.write_text("sasl.password hunter2\n")
    with pytest.raises(ConfigurationError, match="line 1") as raised:
        settings_from_environment({"POSTROOM_KAFKA_CONFIG_FILE": str(config)})
    assert "hunter2" not in str(raised.value)
    with pytest.raises(ConfigurationError, match="cannot be read"):
        settings_from_environment({"POSTROOM_KAFKA_CONFIG_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    "url",
    ["kafka://h:99999?sasl.password=hunter2", "kafka://h:9092/path?sasl.password=hunter2"],
)
def test_kafka_url_errors_do_not_echo_secrets(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_kafka_url(url, {})
    assert "hunter2" not in str(raised.value)
    assert "sasl.password=***" in str(raised.value)
