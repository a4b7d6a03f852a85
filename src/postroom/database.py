"""Engines for postroom's own services and CLI, and readable connection errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from postroom.errors import (
    ConfigurationError,
    DatabaseError,
    MissingRightsError,
    SchemaMissingError,
)
from postroom.urls import describe_url, normalize_database_url, scrub


def create_engine(database_url: str, *, pool_size: int = 5, pre_ping: bool = True) -> Engine:
    """A sync engine on the psycopg driver, with pre-ping so dropped connections are replaced.

    ``pre_ping=False`` saves a round trip per checkout, for callers that treat a failed
    statement on a dropped connection as an outage and try again (the consumer).
    """
    return sa_create_engine(
        normalize_database_url(database_url), pool_size=pool_size, pool_pre_ping=pre_ping
    )


def create_async_engine(
    database_url: str, *, pool_size: int = 5, pre_ping: bool = True
) -> AsyncEngine:
    """An asyncio engine on the psycopg driver, with pre-ping (see :func:`create_engine`)."""
    return sa_create_async_engine(
        normalize_database_url(database_url), pool_size=pool_size, pool_pre_ping=pre_ping
    )


@contextlib.contextmanager
def readable_errors(database_url: str) -> Iterator[None]:
    """Turn driver errors about reaching the database or missing tables into postroom errors."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise translate(exc, database_url) from exc
    except psycopg.Error as exc:
        raise translate(exc, database_url) from exc


#: How psycopg begins the error of a connection string it cannot use.
_BAD_DSN = ("invalid connection option", "invalid dsn", 'missing "="', "invalid integer value")


def translate(exc: BaseException, database_url: str, *, always: bool = False) -> Exception:
    """The postroom error that explains ``exc``, or ``exc`` itself if it is not one we know.

    With ``always``, an unknown driver error becomes a DatabaseError too (for services
    that back off and retry on any database failure rather than stop).
    """
    original = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    where = describe_url(database_url)
    said = scrub(str(original).strip(), database_url)
    first_line = said.splitlines()[0] if said else ""
    if isinstance(original, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return SchemaMissingError(
            f"postroom's tables are missing in {where} ({first_line}); "
            "create them with `postroom db upgrade`"
        )
    if isinstance(original, psycopg.errors.InsufficientPrivilege):
        return MissingRightsError(
            f"the role connected to {where} lacks a right postroom needs ({first_line}); "
            "`postroom db check --role writer|relay|consumer|operator` names what is missing "
            "and `postroom db grants` prints the grants"
        )
    if isinstance(original, psycopg.ProgrammingError) and first_line.startswith(_BAD_DSN):
        return ConfigurationError(
            f"the database URL for {where} is not usable ({first_line}); fix "
            "POSTROOM_DATABASE_URL (or --database-url): "
            "postgresql://user:password@host:5432/dbname[?libpq-option=value]"
        )
    if isinstance(original, psycopg.OperationalError):
        return DatabaseError(
            f"cannot reach PostgreSQL at {where}, or the connection was lost: {first_line}; "
            "check POSTROOM_DATABASE_URL (or --database-url) and that the server is running"
        )
    if isinstance(exc, Exception) and not always:
        return exc
    return DatabaseError(
        f"the database refused a statement: {first_line or type(original).__name__}"
    )
