"""Settings: one object, filled from arguments or ``POSTROOM_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from postroom.errors import ConfigurationError
from postroom.message import DEFAULT_MAX_PAYLOAD_BYTES
from postroom.schema.tables import (
    DEFAULT_INBOX_TABLE,
    DEFAULT_OUTBOX_TABLE,
    DEFAULT_SCHEMA,
    Tables,
    build_tables,
)

ENV_PREFIX: Final = "POSTROOM_"
DEFAULT_DATABASE_URL: Final = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Where postroom's tables and broker are. Each field reads ``POSTROOM_<FIELD>``."""

    database_url: str = _setting(
        DEFAULT_DATABASE_URL,
        "PostgreSQL URL (postgresql://user:pass@host:port/db); the psycopg driver is used.",
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "database_url", normalize_database_url(self.database_url))
        if self.max_payload_bytes <= 0:
            raise ConfigurationError(
                "max_payload_bytes must be a positive number of bytes, "
                f"got {self.max_payload_bytes}"
            )
        self.tables()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``POSTROOM_*`` variables, with ``overrides`` (not None) on top."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = source.get(env_var(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, type(f.default))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def tables(self) -> Tables:
        """postroom's tables under these settings' names."""
        return build_tables(self.schema, self.outbox_table, self.inbox_table)

    def help_for(self, name: str) -> str:
        """The help text of one field, for CLI options."""
        return str(next(f for f in dataclasses.fields(self) if f.name == name).metadata["help"])


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
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{env_var(name)}={raw!r} is not a whole number") from None
    return raw


def normalize_database_url(url: str) -> str:
    """Check a PostgreSQL URL and make it use the psycopg driver."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} is not a URL; "
            "use postgresql://user:password@host:5432/dbname"
        ) from None
    backend = parsed.drivername.split("+", 1)[0]
    if backend not in {"postgresql", "postgres"}:
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} is not a PostgreSQL URL; "
            "postroom needs postgresql://user:password@host:5432/dbname"
        )
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.drivername != "postgresql+psycopg":
        raise ConfigurationError(
            f"database URL driver {parsed.drivername!r} is not supported; "
            "use postgresql:// or postgresql+psycopg:// (psycopg 3)"
        )
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[1]}"))


def psycopg_conninfo(database_url: str) -> str:
    """The libpq form of a database URL (for psycopg connections made outside SQLAlchemy)."""
    return (
        make_url(normalize_database_url(database_url))
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )
