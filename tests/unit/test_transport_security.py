"""Broker settings that turn off TLS checks or load code are refused unless allowed, and
RabbitMQ's TLS files come from the environment."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from postroom.brokers.kafka.settings import parse_kafka_url
from postroom.brokers.rabbitmq.tls import connection_url
from postroom.errors import ConfigurationError

ALLOWED = {"POSTROOM_ALLOW_INSECURE_TLS": "true"}


@pytest.mark.parametrize(
    ("query", "environ", "named"),
    [
        ("enable.ssl.certificate.verification=false", {}, "enable.ssl.certificate.verification"),
        ("ssl.endpoint.identification.algorithm=none", {}, "ssl.endpoint.identification"),
        ("plugin.library.paths=/tmp/evil.so", {}, "plugin.library.paths"),
        ("", {"POSTROOM_KAFKA_SSL_ENGINE_LOCATION": "/tmp/engine.so"}, "ssl.engine.location"),
        ("", {"POSTROOM_KAFKA_SASL_KERBEROS_KINIT_CMD": "touch /tmp/x"}, "kinit.cmd"),
    ],
)
def test_kafka_settings_that_weaken_tls_or_load_code_are_refused(
    query: str, environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_kafka_url(f"kafka://broker:9093?{query}", environ)
    said = str(raised.value)
    assert named in said
    assert "POSTROOM_ALLOW_INSECURE_TLS=true" in said
    assert "\n" not in said
    _, settings = parse_kafka_url(f"kafka://broker:9093?{query}", {**environ, **ALLOWED})
    assert any(named in name for name in settings)


def test_kafka_settings_that_keep_the_checks_on_are_accepted() -> None:
    environ = {"POSTROOM_KAFKA_ENABLE_SSL_CERTIFICATE_VERIFICATION": "true"}
    query = "security.protocol=SASL_SSL&ssl.endpoint.identification.algorithm=https"
    _, settings = parse_kafka_url(f"kafka://broker:9093?{query}", environ)
    assert settings["enable.ssl.certificate.verification"] == "true"
    assert settings["ssl.endpoint.identification.algorithm"] == "https"


def test_amqps_without_certificate_check_is_refused_unless_allowed() -> None:
    url = "amqps://u:p@rabbit:5671/?no_verify_ssl=1"
    with pytest.raises(ConfigurationError, match=r"no_verify_ssl .*POSTROOM_ALLOW_INSECURE_TLS"):
        connection_url(url, {})
    assert connection_url(url, ALLOWED).endswith("no_verify_ssl=1")


def test_amqps_takes_its_tls_files_from_the_environment_and_the_url_wins(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "other-ca.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {
        "POSTROOM_AMQP_CA_FILE": str(tmp_path / "ca.pem"),
        "POSTROOM_AMQP_CERT_FILE": str(tmp_path / "cert.pem"),
        "POSTROOM_AMQP_KEY_FILE": str(tmp_path / "key.pem"),
    }
    query = parse_qs(urlsplit(connection_url("amqps://u:p@rabbit:5671/", environ)).query)
    assert query == {
        "cafile": [str(tmp_path / "ca.pem")],
        "certfile": [str(tmp_path / "cert.pem")],
        "keyfile": [str(tmp_path / "key.pem")],
    }
    own = f"amqps://u:p@rabbit:5671/?cafile={tmp_path / 'other-ca.pem'}"
    assert parse_qs(urlsplit(connection_url(own, environ)).query)["cafile"] == [
        str(tmp_path / "other-ca.pem")
    ]
    # A plain amqp:// URL takes none of them.
    assert connection_url("amqp://u:p@rabbit:5672/", environ) == "amqp://u:p@rabbit:5672/"


def test_an_unreadable_amqp_tls_file_is_named(tmp_path: Path) -> None:
    environ = {"POSTROOM_AMQP_CA_FILE": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigurationError, match=r"POSTROOM_AMQP_CA_FILE .*cannot be read"):
        connection_url("amqps://u:p@rabbit:5671/", environ)
