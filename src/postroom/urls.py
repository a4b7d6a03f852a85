"""URL helpers: check and normalise database URLs, and keep passwords out of text.

A leaf module: it imports nothing from the rest of postroom but its errors, so settings,
engines and broker adapters can all use it without importing each other.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

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


#: Names of settings whose values are secret (matched anywhere in the name, any case).
_SECRET_NAME = re.compile(r"password|secret|key|token|credential|^sasl\.|^ssl\.key", re.IGNORECASE)
#: Setting names whose values are public although they match the pattern above.
_PUBLIC_NAMES = frozenset({"sasl.mechanism", "sasl.mechanisms", "sasl.username"})
#: URLs inside free text (error messages), for :func:`redact_text`.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def is_secret_setting(name: str) -> bool:
    """True when a setting (a URL query parameter, a client option) holds a secret."""
    return name.lower() not in _PUBLIC_NAMES and bool(_SECRET_NAME.search(name))


def redact_query_value(name: str, value: str) -> str:
    """``value``, or ``***`` when ``name`` looks like a secret's (password, key, sasl.* ...)."""
    return "***" if is_secret_setting(name) else value


def redact_url(url: str) -> str:
    """The URL with any password, and any query value whose name looks secret, replaced by
    ``***``; safe for logs and output."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        userinfo = netloc[0].split(":", 1)[0] + ":***"
        parts = parts._replace(netloc=f"{userinfo}@{netloc[1]}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(is_secret_setting(name) for name, _ in pairs):
            query = "&".join(
                f"{quote(name, safe='.')}={quote(redact_query_value(name, value), safe='*')}"
                for name, value in pairs
            )
            parts = parts._replace(query=query)
    return urlunsplit(parts)


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


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
