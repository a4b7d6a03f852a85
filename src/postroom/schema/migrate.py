"""Run postroom's shipped Alembic migrations: upgrade, check, offline SQL."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select, text

from postroom.database import create_engine, readable_errors
from postroom.errors import ConfigurationError, SchemaMissingError
from postroom.schema.sql import quote_identifier
from postroom.schema.steps import create_schema_if_missing
from postroom.schema.tables import Tables

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: Key of the advisory lock that serialises concurrent `db upgrade` runs.
MIGRATION_LOCK_KEY = 0x706F7374726F6F6D  # "postroom"


@dataclass(frozen=True)
class SchemaStatus:
    """Where the database's postroom schema stands against the installed package."""

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        """True when every shipped migration has been applied."""
        return self.current == self.head


def _config(tables: Tables | None, **attributes: Any) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["tables"] = tables
    config.attributes.update(attributes)
    return config


def head_revision() -> str:
    """The newest revision shipped with this version of postroom."""
    head = ScriptDirectory.from_config(_config(None)).get_current_head()
    assert head is not None
    return head


def check_revision(revision: str) -> None:
    """Raise ConfigurationError unless ``revision`` is ``head``, ``base`` or one shipped here."""
    scripts = ScriptDirectory.from_config(_config(None))
    shipped = [script.revision for script in scripts.walk_revisions()]
    if revision not in {"head", "base", *shipped}:
        raise ConfigurationError(
            f"revision {revision!r} is not one postroom ships; use head, base or one of "
            f"{', '.join(sorted(shipped))} (see `postroom db check` for where the tables are)"
        )


def upgrade(database_url: str, tables: Tables, revision: str = "head") -> SchemaStatus:
    """Apply postroom's migrations up to ``revision``; safe to run again and concurrently."""
    engine = create_engine(database_url, pool_size=1)
    try:
        with readable_errors(database_url), engine.begin() as connection:
            command.upgrade(_config(tables, connection=connection), revision)
        return status(database_url, tables)
    finally:
        engine.dispose()


def require_current(database_url: str, tables: Tables, who: str) -> None:
    """Raise SchemaMissingError unless every shipped migration has been applied."""
    state = status(database_url, tables)
    if not state.up_to_date:
        found = f"at revision {state.current}" if state.current else "missing"
        raise SchemaMissingError(
            f"postroom's tables are {found}; this {who} needs revision {state.head}. "
            "Run `postroom db upgrade` first."
        )


def downgrade(database_url: str, tables: Tables, revision: str = "base") -> None:
    """Revert postroom's migrations down to ``revision`` (``base`` drops the tables)."""
    engine = create_engine(database_url, pool_size=1)
    try:
        with readable_errors(database_url), engine.begin() as connection:
            command.downgrade(_config(tables, connection=connection), revision)
    finally:
        engine.dispose()


def status(database_url: str, tables: Tables) -> SchemaStatus:
    """The revision applied in the database (None if none) and the package's head."""
    engine = create_engine(database_url, pool_size=1)
    try:
        with readable_errors(database_url), engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "version_table": tables.version_table,
                    "version_table_schema": tables.schema,
                },
            )
            heads = context.get_current_heads()
        return SchemaStatus(current=heads[0] if heads else None, head=head_revision())
    finally:
        engine.dispose()


def offline_sql(tables: Tables, revision: str = "head") -> str:
    """The DDL that ``upgrade`` would run, as SQL text for review or a DBA."""
    buffer = io.StringIO()
    command.upgrade(_config(tables, output_buffer=buffer), revision, sql=True)
    return buffer.getvalue()


def run_environment(context: Any) -> None:
    """Body of the migrations' env.py: configure Alembic for the requested tables."""
    tables: Tables = context.config.attributes["tables"]
    options: dict[str, Any] = {
        "version_table": tables.version_table,
        "version_table_schema": tables.schema,
        "target_metadata": tables.metadata,
        "transactional_ddl": True,
    }
    if context.is_offline_mode():
        # For a DBA to read and run: plain DDL, run by a role that may create the schema.
        create_schema = (
            f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(tables.schema)}"
            if tables.schema
            else None
        )
        context.configure(
            dialect_name="postgresql",
            literal_binds=True,
            output_buffer=context.config.attributes.get("output_buffer"),
            **options,
        )
        with context.begin_transaction():
            if create_schema:
                context.execute(create_schema)
            context.run_migrations()
        return
    connection: Connection = context.config.attributes["connection"]
    connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
    if tables.schema:
        connection.execute(text(create_schema_if_missing(tables.schema)))
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()
