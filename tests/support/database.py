"""Test schemas of their own, and quick reads of the test database."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine


def unique_schema() -> str:
    """A schema name no other test uses."""
    return f"pr_test_{uuid.uuid4().hex[:12]}"


def drop_schema(engine: Engine, schema: str) -> None:
    """Remove a test's schema and everything in it."""
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def count(engine: Engine, sql: str, **params: Any) -> int:
    """The integer ``sql`` (a ``SELECT count(*) ...``) answers with ``params``."""
    with engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())
