"""Settings: one object, filled from arguments or ``POSTROOM_*`` environment variables."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from postroom.cloudevents import DEFAULT_SOURCE, CloudEvents, check_source
from postroom.errors import ConfigurationError
from postroom.message import DEFAULT_MAX_PAYLOAD_BYTES
from postroom.metrics import DEFAULT_METRICS_HOST
from postroom.names import (
    DEFAULT_INBOX_TABLE,
    DEFAULT_OUTBOX_TABLE,
    DEFAULT_SCHEMA,
    validate_table_names,
)
from postroom.urls import check_broker_url, normalize_database_url, redact_settings

ENV_PREFIX: Final = "POSTROOM_"
DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
#: Default metrics ports: each service its own, so a relay and a consumer run side by side.
DEFAULT_METRICS_PORTS: Final = {"relay": 9400, "consumer": 9401}


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, repr=False)
class Settings:
    """Where postroom's tables and broker are. Each field reads ``POSTROOM_<FIELD>``."""

    database_url: str = _setting(
        "",
        "PostgreSQL URL (postgresql://user:pass@host:port/db); the psycopg driver is used. "
        "No default: every command that uses the database needs it.",
    )
    broker_url: str = _setting(
        DEFAULT_BROKER_URL, "Broker URL: amqp://user:pass@host:port/vhost or kafka://host:port,..."
    )
    schema: str = _setting(DEFAULT_SCHEMA, "Schema holding postroom's tables.")
    outbox_table: str = _setting(DEFAULT_OUTBOX_TABLE, "Name of the outbox table.")
    inbox_table: str = _setting(DEFAULT_INBOX_TABLE, "Name of the inbox table.")
    max_payload_bytes: int = _setting(
        DEFAULT_MAX_PAYLOAD_BYTES, "Largest encoded payload enqueue() accepts, in bytes."
    )
    notify: bool = _setting(True, "Wake relays with NOTIFY when a transaction enqueues.")
    relay_id: str = _setting(
        "", "Name of this relay in leases and logs (default: host-pid-random)."
    )
    relay_batch_size: int = _setting(500, "Rows claimed and published per batch.")
    relay_batch_bytes: int = _setting(
        8 * 1024 * 1024,
        "Bytes (payloads and headers) a claimed batch stops at; at least one row is taken.",
    )
    relay_lease: float = _setting(
        15.0, "Partition lease; a dead relay's partitions move to others after this."
    )
    relay_poll_interval: float = _setting(
        1.0, "Longest wait between looks at the outbox when no NOTIFY arrives."
    )
    relay_max_attempts: int = _setting(
        10, "Failed publishes of one row before it is dead-lettered."
    )
    relay_backoff_initial: float = _setting(1.0, "Wait after a row's first failed publish.")
    relay_backoff_max: float = _setting(300.0, "Longest wait between a row's attempts.")
    relay_retention: float = _setting(
        86400.0, "How long published rows are kept (for replay); 0 deletes them at once."
    )
    relay_create_topics: bool = _setting(
        False,
        "Kafka: create a topic that does not exist before the first publish to it (the "
        "cluster's default partitions and replication factor). No effect on RabbitMQ: the "
        "relay declares its exchange there, and queues are the consumers' (postroom broker "
        "setup).",
    )
    cloudevents: str = _setting(
        "off",
        "Relay: publish as CloudEvents (binary content mode: ce_* headers on Kafka, "
        "cloudEvents_* and ce-* headers on RabbitMQ) the messages of these topics: off, all, "
        "or a comma-separated list of topics and glob patterns (orders.*,payments).",
    )
    cloudevents_source: str = _setting(
        DEFAULT_SOURCE,
        "Relay: the CloudEvents source attribute of the messages it publishes as CloudEvents "
        "(a URI reference, e.g. /shop/orders).",
    )
    metrics_port: int | None = _setting(
        None,
        "Port of the /metrics, /healthz and /readyz endpoints; 0 turns them off "
        "(default: 9400 for the relay, 9401 for the consumer).",
    )
    metrics_host: str = _setting(
        DEFAULT_METRICS_HOST,
        "Address the metrics endpoint listens on: 127.0.0.1 (this machine only), 0.0.0.0 or "
        ":: (every interface, e.g. in a Kubernetes pod), or one interface's address.",
    )
    health_timeout: float = _setting(
        120.0,
        "/healthz turns 503 when the service's loop has not turned for this long (the "
        "consumer: or one handler run has lasted this long); keep it above your slowest handler.",
    )
    log_format: str = _setting("auto", "Log format: json, console, or auto (json unless a tty).")
    allow_insecure_tls: bool = _setting(
        False,
        "Accept broker settings that turn off TLS certificate checks (no_verify_ssl, "
        "enable.ssl.certificate.verification=false, ...) or load code "
        "(plugin.library.paths, ...); refused by default.",
    )
    consumer_prefetch: int = _setting(
        32,
        "Consumer: messages received ahead of handling (RabbitMQ prefetch; per Kafka partition).",
    )
    consumer_concurrency: int = _setting(
        8, "Consumer: handlers running at once (Kafka: different partitions only)."
    )
    consumer_max_attempts: int = _setting(
        5, "Consumer: handler runs of one message before it is dead-lettered."
    )
    consumer_backoff_initial: float = _setting(
        1.0, "Consumer: wait after a message's first failed handler run."
    )
    consumer_backoff_max: float = _setting(
        60.0, "Consumer: longest wait between a message's handler runs."
    )
    consumer_id_source: str = _setting(
        "postroom",
        "Consumer: where a message's id is read: postroom (the postroom-id header), amqp "
        "(AMQP message_id), cloudevents (ce_id), or header:<name>.",
    )
    consumer_batch_size: int = _setting(
        16,
        "Consumer: most deliveries of async handlers handled in one database transaction "
        "(Kafka: of one partition); a failed handler sends its batch one by one; 1: a "
        "transaction per message.",
    )
    consumer_batch_linger: float = _setting(
        0.002, "Consumer: longest wait for more deliveries to fill a batch."
    )
    consumer_max_message_bytes: int = _setting(
        16 * 1024 * 1024,
        "Consumer: largest message (body and headers) handed to a handler (default 16 MiB); "
        "larger ones are dead-lettered without their body.",
    )
    inbox_retention: float = _setting(
        604800.0,
        "Consumer: how long inbox rows are kept for deduplication (default 7d); 0 keeps them.",
    )

    def __post_init__(self) -> None:
        if self.database_url:
            object.__setattr__(self, "database_url", normalize_database_url(self.database_url))
        _check_bounds(self)
        check_broker_url(self.broker_url)
        if self.max_payload_bytes <= 0:
            raise ConfigurationError(
                "max_payload_bytes must be a positive number of bytes, "
                f"got {self.max_payload_bytes}"
            )
        validate_table_names(self.schema, self.outbox_table, self.inbox_table)
        positive: tuple[str, ...] = (
            "relay_batch_size",
            "relay_lease",
            "relay_poll_interval",
            "relay_max_attempts",
        )
        positive += ("relay_batch_bytes",)
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(
                    f"{name} must be positive, got {getattr(self, name)} (set {env_var(name)})"
                )
        for name in ("relay_backoff_initial", "relay_backoff_max", "relay_retention"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must not be negative (set {env_var(name)})")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics_port must be 0-65535, got {self.metrics_port}")
        validate_host(self.metrics_host)
        if not 0 < self.health_timeout < math.inf:
            raise ConfigurationError(
                f"health_timeout must be a positive duration, got {self.health_timeout} "
                f"(set {env_var('health_timeout')})"
            )
        if not 1024 <= self.consumer_max_message_bytes <= 1024**3:
            raise ConfigurationError(
                "consumer_max_message_bytes must be between 1024 and 1073741824 bytes, got "
                f"{self.consumer_max_message_bytes} (set {env_var('consumer_max_message_bytes')})"
            )
        check_source(self.cloudevents_source)
        self.cloudevents_policy()
        if self.log_format not in {"auto", "json", "console"}:
            raise ConfigurationError(
                f"log_format must be json, console or auto, got {self.log_format!r}"
            )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.shown().items())
        return f"Settings({fields})"

    def shown(self, *names: str) -> dict[str, Any]:
        """The settings (``names`` only, if given) as a dict safe to log or print: URLs
        without passwords or secret query values (see :func:`postroom.urls.redact_settings`)."""
        values = dataclasses.asdict(self)
        return redact_settings({k: values[k] for k in names} if names else values)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``POSTROOM_*`` variables, with ``overrides`` (not None) on top."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = source.get(env_var(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, field_type(f.name))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def cloudevents_policy(self) -> CloudEvents | None:
        """The topics the relay publishes as CloudEvents and their source (None: off);
        raises ConfigurationError for an unusable ``cloudevents`` or ``cloudevents_source``."""
        return CloudEvents.parse(self.cloudevents, self.cloudevents_source)

    def metrics_port_for(self, service: str) -> int:
        """The metrics port of ``service`` (``relay`` or ``consumer``): ``metrics_port`` if
        set, else the service's own default (relay 9400, consumer 9401)."""
        if self.metrics_port is not None:
            return self.metrics_port
        return DEFAULT_METRICS_PORTS[service]

    def help_for(self, name: str) -> str:
        """The help text of one field, for CLI options."""
        return str(next(f for f in dataclasses.fields(self) if f.name == name).metadata["help"])


#: The largest whole number a setting takes (PostgreSQL's integer).
MAX_SETTING_INT: Final = 2**31 - 1
#: The longest duration an option or setting takes: 100 years.
MAX_DURATION: Final = 36500 * 86400.0


def _check_bounds(settings: Settings) -> None:
    """Raise ConfigurationError for a number or duration no setting can use."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if type(value) is int and abs(value) > MAX_SETTING_INT:
            raise ConfigurationError(
                f"{f.name} is {value}, more than {MAX_SETTING_INT:,}; use a smaller number "
                f"(set {env_var(f.name)})"
            )
        if type(value) is float and not (-MAX_DURATION <= value <= MAX_DURATION):
            raise ConfigurationError(
                f"{f.name} is longer than 36500d (100 years); use a shorter duration "
                f"(set {env_var(f.name)})"
            )


_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def validate_host(host: object) -> None:
    """Raise ConfigurationError unless ``host`` is an IP address or a host name."""
    if isinstance(host, str):
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)
            return
        if _HOSTNAME.fullmatch(host) and not host.rsplit(".", 1)[-1].isdigit():
            return
    raise ConfigurationError(
        f"metrics_host {host!r} is not an IP address or host name; use 127.0.0.1 (this "
        f"machine only) or 0.0.0.0 (every interface) (set {env_var('metrics_host')})"
    )


def field_type(name: str) -> type:
    """The type of Settings field ``name`` (``int`` for ``metrics_port``, whose default
    None means the service's own port)."""
    default = next(f.default for f in dataclasses.fields(Settings) if f.name == name)
    return int if default is None else type(default)


def env_var(field_name: str) -> str:
    """The environment variable that sets a field: ``POSTROOM_`` + its upper-cased name."""
    return ENV_PREFIX + field_name.upper()


def _parse(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigurationError(f"{env_var(name)}={raw!r} is not a boolean; use true or false")
    if kind is float:
        return parse_duration(raw, what=env_var(name))
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{env_var(name)}={raw!r} is not a whole number") from None
    return raw


_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Seconds from ``"90"``, ``"1.5s"``, ``"250ms"``, ``"5m"``, ``"24h"`` or ``"7d"``.

    At most :data:`MAX_DURATION` (100 years); anything else raises ConfigurationError.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ConfigurationError(
            f"{what}={text!r} is not a duration; use a number of seconds or a number with "
            "a unit: 250ms, 30s, 5m, 24h, 7d"
        )
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds > MAX_DURATION:
        raise ConfigurationError(
            f"{what}={text!r} is longer than 36500d (100 years); use a shorter duration"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest way :func:`parse_duration` reads ``seconds`` back: ``7d``, ``24h``, ``5m``,
    ``1s``, ``250ms``.

    A unit is used when the duration is a whole number of at least two of it, so a day
    shows as ``24h`` and a minute as ``60s``.
    """
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        count = seconds / size
        if count.is_integer() and (count >= 2 or unit == "s"):
            return f"{int(count)}{unit}"
    if (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"
