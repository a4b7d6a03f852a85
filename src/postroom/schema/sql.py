"""SQL text for the hot statements, rendered once per set of table names."""

from __future__ import annotations

import functools
from typing import Literal

from sqlalchemy import Table

from postroom.schema.tables import Tables

ParamStyle = Literal["named", "pyformat"]

#: Columns of one outbox insert, with the array type each is sent as.
INSERT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "uuid[]"),
    ("topic", "text[]"),
    ("key", "text[]"),
    ("partition", "smallint[]"),
    ("payload", "bytea[]"),
    ("content_type", "text[]"),
    ("headers", "jsonb[]"),
    ("created_at", "timestamptz[]"),
    ("available_at", "timestamptz[]"),
    ("delay_seconds", "float8[]"),
)


def quoted_table(table: Table) -> str:
    """The table's schema-qualified name, quoted for PostgreSQL."""
    if table.schema is None:
        return quote_identifier(table.name)
    return f"{quote_identifier(table.schema)}.{quote_identifier(table.name)}"


def quote_identifier(name: str) -> str:
    """Quote one identifier for PostgreSQL (always, so no name is ever read as a keyword)."""
    return '"' + name.replace('"', '""') + '"'


def _placeholder(name: str, style: ParamStyle) -> str:
    return f":{name}" if style == "named" else f"%({name})s"


@functools.cache
def insert_outbox_sql(tables: Tables, style: ParamStyle, notify: bool) -> str:
    """One statement that inserts a batch of rows from parallel arrays.

    The text is the same for any batch size, so the server can reuse its plan. With
    ``notify`` the same statement signals the relays' channel; PostgreSQL delivers one
    notification per transaction for repeated identical signals, so a transaction that
    enqueues many times still wakes the relays once, at commit.
    """
    arrays = ", ".join(
        f"CAST({_placeholder(name, style)} AS {array_type})" for name, array_type in INSERT_COLUMNS
    )
    names = ", ".join(name for name, _ in INSERT_COLUMNS)
    insert = (
        f"INSERT INTO {quoted_table(tables.outbox)} "
        "(id, topic, key, partition, payload, content_type, headers, created_at, available_at, "
        "next_attempt_at) "
        "SELECT r.id, r.topic, r.key, r.partition, r.payload, r.content_type, r.headers, "
        "r.created_at, r.available_at, now() + r.delay_seconds * interval '1 second' "
        f"FROM unnest({arrays}) AS r({names})"
    )
    if not notify:
        return insert
    return (
        f"WITH inserted AS ({insert} RETURNING 1) "
        f"SELECT pg_notify({_placeholder('channel', style)}, '') "
        "FROM (SELECT 1 FROM inserted LIMIT 1) AS any_row"
    )
