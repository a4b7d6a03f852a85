"""URL helpers: check and normalise database URLs, and keep passwords out of text.

A leaf module: it imports nothing from the rest of postroom but its errors, so settings,
engines and broker adapters can all use it without importing each other.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from psycopg import pq
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from postroom.errors import ConfigurationError

#: What a missing database URL says (every entry point that needs the database raises it).
NO_DATABASE_URL: Final = (
    "POSTROOM_DATABASE_URL is not set: export "
    "POSTROOM_DATABASE_URL=postgresql://user:password@host:5432/dbname (or pass --database-url)"
)


def normalize_database_url(url: str) -> str:
    """Check a PostgreSQL URL and make it use the psycopg driver.

    An empty URL raises ConfigurationError saying how to set one (there is no default
    database); so do a port that is not 1-65535 and a query option libpq does not know.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(NO_DATABASE_URL)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} is not a URL (or its port is not a number); "
            "use postgresql://user:password@host:5432/dbname"
        ) from None
    _check_port_and_options(url, parsed)
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


#: The schemes of the brokers postroom talks to.
BROKER_SCHEMES: Final = ("amqp", "amqps", "kafka", "memory")
#: The broker URL forms postroom accepts, for error messages and help texts.
BROKER_URL_FORMS: Final = (
    "amqp://user:password@host:5672/vhost, amqps://user:password@host:5671/vhost, "
    "kafka://host:9092[,host2:9092][?librdkafka.setting=value] or memory://[name]"
)


def check_broker_url(url: str) -> None:
    """Raise ConfigurationError unless ``url`` has a broker scheme postroom knows and its
    ports are numbers (1-65535); what each broker accepts beyond that it checks itself."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in BROKER_SCHEMES:
        raise ConfigurationError(
            f"broker URL {redact_url(url)!r} is not one postroom can use; use {BROKER_URL_FORMS}"
        )
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if parts.scheme.lower() != "memory" else ():
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host else ""
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigurationError(
                f"broker URL {redact_url(url)!r} has port {port!r}, not a number from 1 to "
                f"65535; use {BROKER_URL_FORMS}"
            )


def _check_port_and_options(url: str, parsed: URL) -> None:
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} has port {parsed.port}, not 1-65535; "
            "use postgresql://user:password@host:5432/dbname"
        )
    unknown = sorted(set(parsed.query) - _libpq_options())
    if unknown:
        raise ConfigurationError(
            f"database URL {redact_url(url)!r} has query option {unknown[0]!r}, which "
            "PostgreSQL's client does not know; remove it or use a libpq connection "
            "option such as sslmode, connect_timeout or application_name"
        )


def _libpq_options() -> set[str]:
    """The connection options (``?name=value``) the installed libpq accepts."""
    return {option.keyword.decode() for option in pq.Conninfo.get_defaults()}


#: Query parameter and setting names whose values are secrets (searched, case-insensitive).
SECRET_NAME: Final = re.compile(r"pass|pwd|secret|key|token|credential|^sasl\.", re.IGNORECASE)
HIDDEN: Final = "***"
UNPARSEABLE: Final = "<unparseable URL, not shown>"
#: URLs inside free text (error messages), for :func:`redact_text`.
_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def looks_secret(name: str) -> bool:
    """True if a setting or query parameter called ``name`` holds a secret."""
    return SECRET_NAME.search(name) is not None


def redact_query_value(name: str, value: str) -> str:
    """``value``, or ``***`` when ``name`` looks like a secret's (password, key, sasl.* ...)."""
    return HIDDEN if looks_secret(name) else value


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def redact_url(url: str) -> str:
    """The URL with its password and secret query values replaced by ``***``.

    Safe for logs and output: a query value is hidden when its name looks like a secret
    (``password``, ``secret``, ``key``, ``token``, ``sasl.*``, ``ssl.key*``, any case), and a
    text that does not parse as ``scheme://host...`` is never echoed at all.
    """
    if not isinstance(url, str):
        return UNPARSEABLE
    try:
        parts = urlsplit(url)
    except ValueError:
        return UNPARSEABLE
    if not parts.scheme or not url.startswith(f"{parts.scheme}://") or not parts.netloc:
        return UNPARSEABLE
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{HIDDEN}@{hosts}"
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def _redact_pair(pair: str) -> str:
    name, equals, _ = pair.partition("=")
    return f"{name}={HIDDEN}" if equals and looks_secret(unquote_plus(name)) else pair


def scrub(text: str, *urls: str) -> str:
    """``text`` with the passwords and secret query values of ``urls`` replaced by ``***``
    (for error texts of drivers that may quote what they were given)."""
    for url in urls:
        for secret in _secrets_of(url):
            text = text.replace(secret, HIDDEN)
    return text


def _secrets_of(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = [password, unquote_plus(password)] if password else []
    for pair in parts.query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and value and looks_secret(unquote_plus(name)):
            found += [value, unquote_plus(value)]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def redact_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` safe to log: URLs through :func:`redact_url`, secrets hidden."""
    shown: dict[str, Any] = {}
    for name, value in values.items():
        if looks_secret(name):
            shown[name] = HIDDEN
        elif isinstance(value, str) and value and (name.endswith("url") or "://" in value):
            shown[name] = redact_url(value)
        else:
            shown[name] = value
    return shown


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


#: Environment variable that lets broker settings turn off certificate checks or load code.
ALLOW_INSECURE_TLS_ENV: Final = "POSTROOM_ALLOW_INSECURE_TLS"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


def insecure_tls_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """True if ``POSTROOM_ALLOW_INSECURE_TLS`` (or ``--allow-insecure-tls``) is set."""
    env = os.environ if environ is None else environ
    return env.get(ALLOW_INSECURE_TLS_ENV, "").strip().lower() in _TRUE


def refuse_insecure(setting: str, why: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigurationError for ``setting`` (which ``why`` explains) unless insecure
    broker settings are explicitly allowed."""
    if not insecure_tls_allowed(environ):
        raise ConfigurationError(
            f"the broker setting {setting} {why}, so postroom refuses it; remove it, or set "
            f"{ALLOW_INSECURE_TLS_ENV}=true (--allow-insecure-tls) if you really mean it"
        )
