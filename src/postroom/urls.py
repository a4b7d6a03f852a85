"""URL helpers: check and normalise database URLs, and keep passwords out of text.

A leaf module: it imports nothing from the rest of postroom but its errors, so settings,
engines and broker adapters can all use it without importing each other.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from postroom.errors import ConfigurationError


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


def describe_url(database_url: str) -> str:
    """``user@host:port/db`` without the password, for messages."""
    url = make_url(normalize_database_url(database_url))
    return f"{url.username or ''}@{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
