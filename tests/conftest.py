"""Fixtures shared by every suite: the real PostgreSQL, and fresh postroom tables per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from postroom.config import DEFAULT_DATABASE_URL
from postroom.database import create_async_engine, create_engine
from postroom.outbox import Outbox
from postroom.schema import Tables, build_tables, migrate
from postroom.urls import normalize_database_url, psycopg_conninfo

pytest_plugins = ["tests.support.services"]


def require_service(name: str, reason: str) -> None:
    """Fail (under CI) or skip (on a developer machine) when a service is missing."""
    message = f"{name} is not available: {reason}; run `make services`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def database_url() -> str:
    """The test database's URL (POSTROOM_DATABASE_URL), checked to answer."""
    url = normalize_database_url(os.environ.get("POSTROOM_DATABASE_URL") or DEFAULT_DATABASE_URL)
    try:
        with psycopg.connect(psycopg_conninfo(url), connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        require_service("PostgreSQL", str(exc).strip())
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


def unique_schema() -> str:
    """A schema name no other test uses."""
    return f"pr_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def tables(database_url: str, engine: Engine) -> Iterator[Tables]:
    """postroom's tables, created by the shipped migrations in a schema of this test's own."""
    schema = unique_schema()
    tables = build_tables(schema)
    migrate.upgrade(database_url, tables)
    yield tables
    drop_schema(engine, schema)


def drop_schema(engine: Engine, schema: str) -> None:
    """Remove a test's schema and everything in it."""
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture
def outbox(tables: Tables) -> Outbox:
    """An Outbox writing into this test's tables."""
    return Outbox(tables)
