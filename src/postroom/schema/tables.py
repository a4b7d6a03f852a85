"""SQLAlchemy Core definitions of postroom's tables: the one source of truth for the schema."""

from __future__ import annotations

import functools
import uuid
import zlib
from dataclasses import dataclass
from typing import Final, Protocol

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from postroom.names import (
    DEFAULT_INBOX_TABLE,
    DEFAULT_OUTBOX_TABLE,
    DEFAULT_SCHEMA,
    validate_identifier,
    validate_table_names,
)

__all__ = [
    "DEAD",
    "DEFAULT_INBOX_TABLE",
    "DEFAULT_OUTBOX_TABLE",
    "DEFAULT_SCHEMA",
    "OUTBOX_STORAGE_PARAMETERS",
    "PARTITION_COUNT",
    "PENDING",
    "PUBLISHED",
    "TableNames",
    "Tables",
    "build_tables",
    "partition_for",
    "tables_for",
    "validate_identifier",
]

#: Keys are hashed into this many partitions; each partition has one relay at a time.
PARTITION_COUNT: Final = 64

#: Row states in the outbox.
PENDING: Final = "pending"
PUBLISHED: Final = "published"
DEAD: Final = "dead"

#: Queue-table autovacuum: vacuum after a small share of dead rows, without throttling.
OUTBOX_STORAGE_PARAMETERS: Final = {
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_cost_delay": "0",
}


def partition_for(key: str | None, message_id: uuid.UUID) -> int:
    """The partition a row belongs to: by its key, or spread by its id when it has none."""
    if key is None:
        return message_id.int % PARTITION_COUNT
    return zlib.crc32(key.encode()) % PARTITION_COUNT


@dataclass(frozen=True, eq=False)
class Tables:
    """postroom's tables under one set of names, on one MetaData."""

    schema: str | None
    metadata: MetaData
    outbox: Table
    inbox: Table
    partitions: Table
    relays: Table
    attempts: Table

    @property
    def notify_channel(self) -> str:
        """The LISTEN/NOTIFY channel that wakes relays when rows are added to this outbox."""
        return f"{self.schema or 'public'}.{self.outbox.name}"

    @property
    def version_table(self) -> str:
        """Name of the table in which postroom's own migrations record their revision."""
        return f"{self.outbox.name}_alembic_version"


def build_tables(
    schema: str | None = DEFAULT_SCHEMA,
    outbox: str = DEFAULT_OUTBOX_TABLE,
    inbox: str = DEFAULT_INBOX_TABLE,
    metadata: MetaData | None = None,
) -> Tables:
    """Define postroom's tables under the given names.

    Pass your own ``metadata`` to have the tables join it, for example so Alembic's
    autogenerate sees them; ``schema=None`` puts them in the connection's default schema.
    """
    validate_table_names(schema, outbox, inbox)
    if metadata is None:
        return _cached_tables(schema, outbox, inbox)
    return _define(schema, outbox, inbox, metadata)


class TableNames(Protocol):
    """Anything that names postroom's tables, such as :class:`postroom.config.Settings`."""

    @property
    def schema(self) -> str: ...
    @property
    def outbox_table(self) -> str: ...
    @property
    def inbox_table(self) -> str: ...


def tables_for(names: TableNames) -> Tables:
    """postroom's tables under the names that ``names`` (for example the settings) gives."""
    return build_tables(names.schema, names.outbox_table, names.inbox_table)


@functools.cache
def _cached_tables(schema: str | None, outbox: str, inbox: str) -> Tables:
    return _define(schema, outbox, inbox, MetaData())


def _define(schema: str | None, outbox: str, inbox: str, metadata: MetaData) -> Tables:
    now = func.now()
    outbox_table = Table(
        outbox,
        metadata,
        Column("position", BigInteger, Identity(always=True), nullable=False),
        Column("id", Uuid, nullable=False),
        Column("topic", Text, nullable=False),
        Column("key", Text, nullable=True),
        Column("partition", SmallInteger, nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("content_type", Text, nullable=False),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("available_at", DateTime(timezone=True), nullable=False),
        Column("status", Text, nullable=False, server_default=text(f"'{PENDING}'")),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("last_error", Text, nullable=True),
        Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=now),
        Column("published_at", DateTime(timezone=True), nullable=True),
        Column("dead_lettered_at", DateTime(timezone=True), nullable=True),
        PrimaryKeyConstraint("position", name=f"{outbox}_pkey"),
        UniqueConstraint("id", name=f"{outbox}_id_key"),
        CheckConstraint(
            f"status IN ('{PENDING}', '{PUBLISHED}', '{DEAD}')", name=f"{outbox}_status_check"
        ),
        schema=schema,
        postgresql_with=OUTBOX_STORAGE_PARAMETERS,
        comment="postroom outbox: messages written with business transactions, awaiting the relay.",
    )
    Index(
        f"{outbox}_pending_idx",
        outbox_table.c.position,
        postgresql_where=outbox_table.c.status == PENDING,
    )
    Index(
        f"{outbox}_published_idx",
        outbox_table.c.published_at,
        postgresql_where=outbox_table.c.status == PUBLISHED,
    )
    Index(
        f"{outbox}_dead_idx",
        outbox_table.c.position,
        postgresql_where=outbox_table.c.status == DEAD,
    )
    Index(
        f"{outbox}_retrying_idx",
        outbox_table.c.key,
        outbox_table.c.position,
        postgresql_where=(outbox_table.c.status == PENDING) & (outbox_table.c.attempts > 0),
    )
    inbox_table = Table(
        inbox,
        metadata,
        Column("consumer", Text, nullable=False),
        Column("message_id", Text, nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=now),
        PrimaryKeyConstraint("consumer", "message_id", name=f"{inbox}_pkey"),
        schema=schema,
        comment="postroom inbox: messages each consumer has handled, for deduplication.",
    )
    Index(f"{inbox}_processed_at_idx", inbox_table.c.processed_at)
    partitions_table = Table(
        f"{outbox}_partitions",
        metadata,
        Column("partition", SmallInteger, nullable=False, autoincrement=False),
        Column("owner", Text, nullable=True),
        Column("token", Uuid, nullable=True),
        Column("lease_expires_at", DateTime(timezone=True), nullable=True),
        PrimaryKeyConstraint("partition", name=f"{outbox}_partitions_pkey"),
        schema=schema,
        comment="postroom relay leases: which relay publishes each partition of the outbox.",
    )
    relays_table = Table(
        f"{outbox}_relays",
        metadata,
        Column("relay_id", Text, nullable=False),
        Column("host", Text, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False, server_default=now),
        Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=now),
        Column("broker_state", Text, nullable=False, server_default=text("'connecting'")),
        Column("broker_error", Text, nullable=True),
        Column("broker_state_at", DateTime(timezone=True), nullable=False, server_default=now),
        PrimaryKeyConstraint("relay_id", name=f"{outbox}_relays_pkey"),
        schema=schema,
        comment="postroom relays alive now, for sharing the partitions between them.",
    )
    attempts_table = Table(
        f"{inbox}_attempts",
        metadata,
        Column("consumer", Text, nullable=False),
        Column("message_id", Text, nullable=False),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("last_attempt_at", DateTime(timezone=True), nullable=False, server_default=now),
        PrimaryKeyConstraint("consumer", "message_id", name=f"{inbox}_attempts_pkey"),
        schema=schema,
        comment="postroom delivery counter: how often each consumer was handed each message.",
    )
    Index(f"{inbox}_attempts_at_idx", attempts_table.c.last_attempt_at)
    return Tables(
        schema,
        metadata,
        outbox_table,
        inbox_table,
        partitions_table,
        relays_table,
        attempts_table,
    )
