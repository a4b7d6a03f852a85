"""postroom's schema changes as functions of an Alembic ``op``, one per revision.

Each step is frozen once released: later changes get a new step, never an edit. The
shipped Alembic revisions call these, and so can users who keep postroom's tables in
their own Alembic history (see :func:`upgrade_ops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from postroom.schema.sql import quote_identifier
from postroom.schema.tables import OUTBOX_STORAGE_PARAMETERS, PARTITION_COUNT, Tables

Operations = Any  # alembic.operations.Operations; its proxy methods are not typed


@dataclass(frozen=True)
class Step:
    """One schema revision: its id and how to apply and revert it."""

    revision: str
    upgrade: Callable[[Operations, Tables], None]
    downgrade: Callable[[Operations, Tables], None]


#: The outbox's partial indexes of revision 0001: name, columns, predicate.
_INITIAL_PARTIAL_INDEXES: tuple[tuple[str, list[str], str], ...] = (
    ("pending", ["position"], "status = 'pending'"),
    ("published", ["published_at"], "status = 'published'"),
    ("dead", ["position"], "status = 'dead'"),
    ("retrying", ["key", "position"], "status = 'pending' AND attempts > 0"),
)


def create_schema_if_missing(schema: str) -> str:
    """SQL that creates ``schema`` only when it is missing: a role that may create tables in
    an existing schema but not schemas in the database (CREATE SCHEMA IF NOT EXISTS asks
    for that right even when the schema exists) can then run the migrations."""
    literal = schema.replace("'", "''")
    return (
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_namespace "
        f"WHERE nspname = '{literal}') THEN CREATE SCHEMA {quote_identifier(schema)}; "
        "END IF; END $$"
    )


def _initial_upgrade(op: Operations, tables: Tables) -> None:
    schema = tables.schema
    outbox = tables.outbox.name
    inbox = tables.inbox.name
    if schema is not None:
        op.execute(create_schema_if_missing(schema))
    op.create_table(
        outbox,
        sa.Column("position", sa.BigInteger, sa.Identity(always=True), nullable=False),
        sa.Column("id", sa.Uuid, nullable=False),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=True),
        sa.Column("partition", sa.SmallInteger, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column(
            "headers", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("position", name=f"{outbox}_pkey"),
        sa.UniqueConstraint("id", name=f"{outbox}_id_key"),
        sa.CheckConstraint(
            "status IN ('pending', 'published', 'dead')", name=f"{outbox}_status_check"
        ),
        schema=schema,
        postgresql_with=OUTBOX_STORAGE_PARAMETERS,
        comment="postroom outbox: messages written with business transactions, awaiting the relay.",
    )
    for name, columns, where in _INITIAL_PARTIAL_INDEXES:
        op.create_index(
            f"{outbox}_{name}_idx", outbox, columns, schema=schema, postgresql_where=sa.text(where)
        )
    op.create_table(
        inbox,
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column(
            "processed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=f"{inbox}_pkey"),
        schema=schema,
        comment="postroom inbox: messages each consumer has handled, for deduplication.",
    )
    op.create_index(f"{inbox}_processed_at_idx", inbox, ["processed_at"], schema=schema)
    partitions = op.create_table(
        f"{outbox}_partitions",
        sa.Column("partition", sa.SmallInteger, nullable=False, autoincrement=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("token", sa.Uuid, nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("partition", name=f"{outbox}_partitions_pkey"),
        schema=schema,
        comment="postroom relay leases: which relay publishes each partition of the outbox.",
    )
    op.bulk_insert(partitions, [{"partition": p} for p in range(PARTITION_COUNT)])
    op.create_table(
        f"{outbox}_relays",
        sa.Column("relay_id", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("relay_id", name=f"{outbox}_relays_pkey"),
        schema=schema,
        comment="postroom relays alive now, for sharing the partitions between them.",
    )


def _initial_downgrade(op: Operations, tables: Tables) -> None:
    op.drop_table(tables.relays.name, schema=tables.schema)
    op.drop_table(tables.partitions.name, schema=tables.schema)
    op.drop_table(tables.inbox.name, schema=tables.schema)
    op.drop_table(tables.outbox.name, schema=tables.schema)


def _broker_state_upgrade(op: Operations, tables: Tables) -> None:
    schema = tables.schema
    relays = tables.relays.name
    op.add_column(
        relays,
        sa.Column("broker_state", sa.Text, nullable=False, server_default=sa.text("'connecting'")),
        schema=schema,
    )
    op.add_column(relays, sa.Column("broker_error", sa.Text, nullable=True), schema=schema)
    op.add_column(
        relays,
        sa.Column(
            "broker_state_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        schema=schema,
    )
    attempts = f"{tables.inbox.name}_attempts"
    op.create_table(
        attempts,
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column(
            "last_attempt_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=f"{attempts}_pkey"),
        schema=schema,
        comment="postroom delivery counter: how often each consumer was handed each message.",
    )
    op.create_index(f"{attempts}_at_idx", attempts, ["last_attempt_at"], schema=schema)


def _broker_state_downgrade(op: Operations, tables: Tables) -> None:
    op.drop_table(f"{tables.inbox.name}_attempts", schema=tables.schema)
    for column in ("broker_state_at", "broker_error", "broker_state"):
        op.drop_column(tables.relays.name, column, schema=tables.schema)


#: Every revision in order; the last is the head.
STEPS: tuple[Step, ...] = (
    Step("0001", _initial_upgrade, _initial_downgrade),
    Step("0002", _broker_state_upgrade, _broker_state_downgrade),
)

HEAD: str = STEPS[-1].revision


def upgrade_ops(op: Operations, tables: Tables, *, after: str | None = None) -> None:
    """Apply postroom's schema steps through ``op``, inside your own Alembic migration.

    ``after=None`` applies every step (use it in the migration that first adds
    postroom's tables); when a later postroom release adds steps, write a new migration
    that calls ``upgrade_ops(op, tables, after="<the last revision you applied>")``.
    """
    revisions = [step.revision for step in STEPS]
    if after is not None and after not in revisions:
        raise ValueError(f"unknown postroom schema revision {after!r}; known: {revisions}")
    start = 0 if after is None else revisions.index(after) + 1
    for step in STEPS[start:]:
        step.upgrade(op, tables)


def downgrade_ops(op: Operations, tables: Tables, *, to: str | None = None) -> None:
    """Revert postroom's schema steps after revision ``to`` (None reverts them all)."""
    revisions = [step.revision for step in STEPS]
    stop = 0 if to is None else revisions.index(to) + 1
    for step in reversed(STEPS[stop:]):
        step.downgrade(op, tables)
