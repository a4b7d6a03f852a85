"""Fixtures shared by every suite: the real PostgreSQL, and fresh postroom tables per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from postroom.database import create_async_engine, create_engine
from postroom.outbox import Outbox
from postroom.schema import Tables, build_tables, migrate
from postroom.urls import normalize_database_url, psycopg_conninfo
from tests.support.database import drop_schema, unique_schema
from tests.support.services import DATABASE_URL, probe

pytest_plugins = ["tests.support.fixtures"]

# postroom has no default database: commands the suites start inherit the test database.
os.environ.setdefault("POSTROOM_DATABASE_URL", DATABASE_URL)


@pytest.fixture(scope="session")
def database_url() -> str:
    """The test database's URL (POSTROOM_DATABASE_URL), checked to answer (with retries)."""
    url = normalize_database_url(DATABASE_URL)

    def attempt(timeout: float) -> None:
        try:
            with psycopg.connect(psycopg_conninfo(url), connect_timeout=max(1, round(timeout))):
                pass
        except psycopg.OperationalError as exc:
            raise OSError(str(exc).strip()) from exc

    probe("PostgreSQL", url, attempt, within=None)
    return url


@pytest.fixture(scope="session")
def conninfo(database_url: str) -> str:
    """The test database in libpq form, for plain psycopg connections."""
    return psycopg_conninfo(database_url)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    """A sync SQLAlchemy engine on the test database."""
    engine = create_engine(database_url, pool_size=10)
    yield engine
    engine.dispose()


@pytest.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An async SQLAlchemy engine on the test database (one per test: engines bind a loop)."""
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def tables(database_url: str, engine: Engine) -> Iterator[Tables]:
    """postroom's tables, created by the shipped migrations in a schema of this test's own."""
    schema = unique_schema()
    tables = build_tables(schema)
    migrate.upgrade(database_url, tables)
    yield tables
    drop_schema(engine, schema)


@pytest.fixture
def outbox(tables: Tables) -> Outbox:
    """An Outbox writing into this test's tables."""
    return Outbox(tables)
