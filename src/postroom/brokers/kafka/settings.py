"""Kafka settings: the ``kafka://`` URL, the settings postroom owns, and what errors mean."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from confluent_kafka import KafkaError

from postroom.brokers.base import Outcome, PublishResult
from postroom.errors import ConfigurationError
from postroom.log import get_logger
from postroom.message import Message
from postroom.urls import redact_url, refuse_insecure

#: Port assumed for a broker given without one in a ``kafka://`` URL.
DEFAULT_PORT: Final = 9092
#: ``message.timeout.ms``: how long librdkafka retries a message before giving up.
DEFAULT_MESSAGE_TIMEOUT_MS: Final = 30_000
#: Seconds connect() waits for the cluster's metadata.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Extra seconds to wait for delivery reports after ``message.timeout.ms``.
DELIVERY_GRACE: Final = 5.0
_POLL_SECONDS: Final = 0.1
_METADATA_SLICE_SECONDS: Final = 0.5

#: Settings postroom sets itself: the delivery guarantees and the callbacks it relies on.
_OWNED_SETTINGS: Final = frozenset(
    {"error_cb", "logger", "on_delivery", "delivery.report.only.error"}
)

_UNAVAILABLE_CODES: Final = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._UNKNOWN_BROKER,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError._DESTROY,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._QUEUE_FULL,
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError._STATE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.THROTTLING_QUOTA_EXCEEDED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        # The idempotent producer's own state, e.g. a broker that lost it on restart.
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.PRODUCER_FENCED,
    }
)
#: Errors that mean the cluster refuses this client: not an outage, a misconfiguration.
REFUSED_CODES: Final = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)
#: What librdkafka says when the broker's certificate is not signed by a trusted CA.
UNTRUSTED_CERTIFICATE: Final = "certificate verify failed"


def untrusted_certificate(error: KafkaError) -> bool:
    """True if ``error`` is a TLS handshake that failed on the broker's certificate: a
    setting to fix, not an outage to wait out."""
    return error.code() == KafkaError._SSL and UNTRUSTED_CERTIFICATE in error.str()


_REJECTED_CODES: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)

_log = get_logger("brokers.kafka")


#: Environment variables ``POSTROOM_KAFKA_<SETTING>`` set librdkafka settings
#: (``POSTROOM_KAFKA_SASL_PASSWORD`` → ``sasl.password``).
ENV_PREFIX: Final = "POSTROOM_KAFKA_"
#: Environment variable naming a ``key=value`` file of librdkafka settings.
CONFIG_FILE_ENV: Final = "POSTROOM_KAFKA_CONFIG_FILE"


def settings_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka settings from ``POSTROOM_KAFKA_CONFIG_FILE`` (a ``key=value`` properties
    file) and ``POSTROOM_KAFKA_<SETTING>`` variables; a variable wins over the file."""
    env = os.environ if environ is None else environ
    settings: dict[str, str] = {}
    path = env.get(CONFIG_FILE_ENV)
    if path:
        settings.update(_read_properties(Path(path)))
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name != CONFIG_FILE_ENV:
            settings[name.removeprefix(ENV_PREFIX).lower().replace("_", ".")] = value
    return settings


def _read_properties(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"{CONFIG_FILE_ENV} names {str(path)!r}, which cannot be read "
            f"({type(exc).__name__}); point it at a readable key=value file"
        ) from None
    settings: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ConfigurationError(
                f"line {number} of {str(path)!r} ({CONFIG_FILE_ENV}) is not key=value; "
                "write one librdkafka setting per line, e.g. security.protocol=SASL_SSL"
            )
        settings[name.strip()] = value.strip()
    return settings


def parse_kafka_url(
    url: str, environ: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str]]:
    """Split ``kafka://host:port,host2:port?setting=value`` into bootstrap servers and settings.

    A missing port means 9092. Query parameters are librdkafka settings (e.g.
    ``?security.protocol=SSL``). Settings also come from the environment (see
    :func:`settings_from_environment`), so credentials need not sit in the URL; a URL
    query parameter wins over the same setting from the environment or the file.
    """
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ConfigurationError(
            f"a Kafka URL must start with kafka:// (this one has scheme {parts.scheme!r}), "
            "e.g. kafka://host:9092,host2:9092"
        )
    if "@" in parts.netloc:
        raise ConfigurationError(
            "Kafka URLs take no user or password; pass sasl.username and sasl.password "
            "in the publisher's config"
        )
    servers = [_server(item.strip(), url) for item in parts.netloc.split(",") if item.strip()]
    if not servers:
        raise ConfigurationError("Kafka URL names no broker; use kafka://host:9092[,host2:9092]")
    if parts.path not in {"", "/"}:
        raise ConfigurationError(
            f"Kafka URL {redact_url(url)!r} has a path; use kafka://host:9092[,host2:9092]"
        )
    settings = settings_from_environment(environ)
    settings.update(parse_qsl(parts.query, keep_blank_values=True))
    check_security(settings, environ)
    return ",".join(servers), settings


#: Settings that turn off a TLS check when they have this value.
_UNVERIFIED: Final = {
    "enable.ssl.certificate.verification": (
        "false",
        "turns off the check of the brokers' TLS certificates",
    ),
    "ssl.endpoint.identification.algorithm": (
        "none",
        "turns off the check that a broker's certificate names its host",
    ),
}
#: Settings that make librdkafka load or run code from the machine, whatever their value.
_LOADS_CODE: Final = {
    "plugin.library.paths": "loads plugin libraries into the process",
    "ssl.engine.location": "loads an OpenSSL engine library into the process",
    "ssl.providers": "loads OpenSSL providers into the process",
    "sasl.kerberos.kinit.cmd": "runs a shell command",
}


def check_security(settings: Mapping[str, str], environ: Mapping[str, str] | None = None) -> None:
    """Refuse settings that turn off certificate checks or load code (unless allowed by
    ``POSTROOM_ALLOW_INSECURE_TLS``); one sentence naming the first such setting."""
    for name, value in settings.items():
        key = name.strip().lower()
        unverified = _UNVERIFIED.get(key)
        if unverified and str(value).strip().lower() == unverified[0]:
            refuse_insecure(f"{key}={value}", unverified[1], environ)
        if key in _LOADS_CODE:
            refuse_insecure(key, _LOADS_CODE[key], environ)


def _server(item: str, url: str) -> str:
    host, port = item, ""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        host = f"[{host}]"
        port = rest.removeprefix(":")
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not port:
        port = str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"Kafka URL {redact_url(url)!r} has an invalid broker address {item!r}; use host:port"
        )
    return f"{host}:{port}"


def classify_error(error: KafkaError, message: Message) -> PublishResult:
    """The result for a message whose produce() call or delivery report carried ``error``."""
    code = error.code()
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return PublishResult(
            Outcome.REJECTED,
            f"too large for the broker: message is too large for Kafka (body "
            f"{len(message.body)} bytes, over the producer's message.max.bytes or the topic's "
            f"max.message.bytes): {_describe(error)}; raise the topic's max.message.bytes or "
            "shrink the message (send a reference to the data instead)",
            permanent=True,
        )
    unavailable = code in _UNAVAILABLE_CODES or (
        code not in _REJECTED_CODES and (error.fatal() or error.retriable())
    )
    if unavailable:
        return PublishResult(
            Outcome.UNAVAILABLE, f"Kafka did not take the message: {_describe(error)}"
        )
    if code in {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}:
        return PublishResult(
            Outcome.REJECTED,
            f"topic {message.topic!r} does not exist and the cluster does not create topics "
            f"on first use ({_describe(error)}); create the topic",
        )
    return PublishResult(Outcome.REJECTED, f"Kafka refused the message: {_describe(error)}")


def _unavailable_after_failure(reason: str) -> PublishResult:
    return PublishResult(
        Outcome.UNAVAILABLE,
        f"the Kafka producer failed ({reason}); a new producer is started for the next publish",
    )


def _describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


class _LibrdkafkaLog:
    """Receives librdkafka's log lines (served by the poll thread) and sends them to structlog."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # librdkafka logs every failed reconnect as an error; outages are reported per
        # message and by error_cb, so its lines are capped at warning.
        _log.log(min(level, logging.WARNING), "librdkafka", detail=fmt % args if args else fmt)


#: librdkafka settings that only consumers understand (kept out of the dead-letter producer).
_CONSUMER_ONLY_SETTINGS: Final = frozenset(
    {
        "group.id",
        "group.instance.id",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "auto.offset.reset",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "isolation.level",
        "partition.assignment.strategy",
        "group.protocol",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.wait.max.ms",
        "max.partition.fetch.bytes",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "enable.partition.eof",
        "check.crcs",
    }
)
#: Settings the subscriber sets itself: commits happen only after the handler's commit.
_SUBSCRIBER_OWNED: Final = frozenset(
    {"group.id", "enable.auto.commit", "enable.auto.offset.store", "on_commit"}
)

Partition = tuple[str, int]


def record_key(record: Any) -> str | None:
    """A consumed record's key as text (None without one)."""
    raw = record.key()
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def record_headers(record: Any) -> dict[str, str]:
    """A consumed record's headers as text (headers without a value left out)."""
    return {
        name: (value.decode(errors="replace") if isinstance(value, bytes) else str(value))
        for name, value in (record.headers() or [])
        if value is not None
    }
