"""Shipped migrations: they build exactly the schema the Table definitions describe."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, text
from sqlalchemy.engine import Connection, Engine

from postroom.schema import Tables, build_tables, migrate
from tests.support.cli import run_postroom
from tests.support.database import drop_schema, unique_schema


def catalog(connection: Connection, schema: str) -> dict[str, Any]:
    """Everything PostgreSQL knows about a schema's tables, with the schema name removed."""
    queries = {
        "columns": """
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attidentity
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE n.nspname = :schema AND c.relkind = 'r' AND a.attnum > 0
              AND NOT a.attisdropped
            ORDER BY 1, a.attnum""",
        "constraints": """
            SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
            FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = :schema ORDER BY 1, 2""",
        "indexes": """
            SELECT tablename, indexname, indexdef FROM pg_indexes
            WHERE schemaname = :schema ORDER BY 1, 2""",
        "storage": """
            SELECT c.relname, c.reloptions, obj_description(c.oid, 'pg_class')
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = :schema AND c.relkind = 'r' ORDER BY 1""",
    }
    result: dict[str, Any] = {}
    for name, query in queries.items():
        rows = connection.execute(text(query), {"schema": schema}).all()
        result[name] = [
            tuple(str(v).replace(f"{schema}.", "<schema>.") for v in row)
            for row in rows
            if "alembic_version" not in str(row[0])
        ]
    return result


def test_migrations_build_exactly_what_the_tables_describe(engine: Engine, tables: Tables) -> None:
    direct = build_tables(unique_schema())
    assert direct.schema is not None
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{direct.schema}"'))
            direct.metadata.create_all(connection)
        with engine.connect() as connection:
            assert tables.schema is not None
            from_migrations = catalog(connection, tables.schema)
            from_tables = catalog(connection, direct.schema)
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_schemas": True,
                    "compare_server_default": True,
                    "include_name": lambda name, kind, parent: (
                        name == tables.schema
                        if kind == "schema"
                        else not str(name).endswith("alembic_version")
                    ),
                },
            )
            differences = compare_metadata(context, tables.metadata)
    finally:
        drop_schema(engine, direct.schema)
    assert from_migrations["columns"], "the catalog query found no columns"
    assert from_migrations == from_tables
    assert differences == []


def test_the_partial_indexes_serve_pending_rows(engine: Engine, tables: Tables) -> None:
    with engine.connect() as connection:
        indexes: dict[str, str] = dict(
            connection.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :s"),
                {"s": tables.schema},
            ).all()
        )
    assert "WHERE (status = 'pending'::text)" in indexes["outbox_pending_idx"]


def table_names(engine: Engine, schema: str) -> list[str]:
    """The tables in ``schema``, sorted."""
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :s ORDER BY 1"),
                {"s": schema},
            ).scalars()
        )


def test_cli_upgrade_is_idempotent_and_check_gates_the_deploy(
    database_url: str, engine: Engine
) -> None:
    schema = unique_schema()
    env = {"POSTROOM_DATABASE_URL": database_url, "POSTROOM_SCHEMA": schema}
    try:
        before = run_postroom("db", "check", env=env)
        assert before.returncode == 1
        assert "missing" in before.stderr
        assert "postroom db upgrade" in before.stderr
        first = run_postroom("db", "upgrade", env=env)
        assert first.returncode == 0, first.stderr
        assert "upgraded from nothing to 0002" in first.stdout
        second = run_postroom("db", "upgrade", env=env)
        assert second.returncode == 0, second.stderr
        assert "already at revision 0002" in second.stdout
        after = run_postroom("db", "check", env=env)
        assert after.returncode == 0, after.stderr
        assert "up to date" in after.stdout
        assert migrate.status(database_url, build_tables(schema)).up_to_date
        assert table_names(engine, schema) == [
            "inbox",
            "inbox_attempts",
            "outbox",
            "outbox_alembic_version",
            "outbox_partitions",
            "outbox_relays",
        ]
    finally:
        drop_schema(engine, schema)


def test_cli_check_fails_when_the_database_is_behind(database_url: str, engine: Engine) -> None:
    schema = unique_schema()
    env = {"POSTROOM_DATABASE_URL": database_url, "POSTROOM_SCHEMA": schema}
    try:
        assert run_postroom("db", "upgrade", env=env).returncode == 0
        with engine.begin() as connection:
            connection.execute(
                text(f'UPDATE "{schema}".outbox_alembic_version SET version_num = :old'),
                {"old": "0000"},
            )
        behind = run_postroom("db", "check", env=env)
        assert behind.returncode == 1
        assert "at revision 0000" in behind.stderr
    finally:
        drop_schema(engine, schema)


def test_db_sql_applied_by_hand_gives_the_same_schema(
    database_url: str, conninfo: str, engine: Engine, tables: Tables
) -> None:
    schema = unique_schema()
    try:
        ddl = run_postroom("db", "sql", "--schema", schema)
        assert ddl.returncode == 0, ddl.stderr
        assert f'CREATE SCHEMA IF NOT EXISTS "{schema}"' in ddl.stdout
        psql = subprocess.run(
            ["psql", conninfo, "-v", "ON_ERROR_STOP=1", "-q"],
            input=ddl.stdout,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert psql.returncode == 0, psql.stderr
        with engine.connect() as connection:
            assert tables.schema is not None
            assert catalog(connection, schema) == catalog(connection, tables.schema)
        check = run_postroom("db", "check", "--schema", schema, "--database-url", database_url)
        assert check.returncode == 0, check.stderr
    finally:
        drop_schema(engine, schema)


def test_custom_table_names_and_downgrade(database_url: str, engine: Engine) -> None:
    schema = unique_schema()
    custom = build_tables(schema, "events_out", "events_in")
    try:
        migrate.upgrade(database_url, custom)
        assert table_names(engine, schema) == [
            "events_in",
            "events_in_attempts",
            "events_out",
            "events_out_alembic_version",
            "events_out_partitions",
            "events_out_relays",
        ]
        migrate.downgrade(database_url, custom, "base")
        assert table_names(engine, schema) == ["events_out_alembic_version"]
        assert migrate.status(database_url, custom).current is None
    finally:
        drop_schema(engine, schema)


def test_revision_0002_upgrades_existing_relays_and_downgrades(
    database_url: str, engine: Engine
) -> None:
    """0002 adds broker state to live relay rows and the attempts table; downgrade removes both."""
    schema = unique_schema()
    names = build_tables(schema, "events_out", "events_in")
    try:
        assert migrate.upgrade(database_url, names, "0001").current == "0001"
        with engine.begin() as connection:
            connection.execute(
                text(
                    f'INSERT INTO "{schema}".events_out_relays (relay_id, host, pid) '
                    "VALUES ('r1', 'h', 1)"
                )
            )
        assert migrate.upgrade(database_url, names).current == "0002"
        with engine.begin() as connection:
            row = connection.execute(
                text(
                    f"SELECT broker_state, broker_error, broker_state_at IS NOT NULL "
                    f'FROM "{schema}".events_out_relays'
                )
            ).one()
            assert tuple(row) == ("connecting", None, True)
            connection.execute(
                text(
                    f'INSERT INTO "{schema}".events_in_attempts (consumer, message_id) '
                    "VALUES ('c', 'm')"
                )
            )
            counted = connection.execute(
                text(f'SELECT attempts FROM "{schema}".events_in_attempts')
            ).scalar_one()
            assert counted == 0
            indexes = connection.execute(
                text(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = :s "
                    "AND tablename = 'events_in_attempts' ORDER BY 1"
                ),
                {"s": schema},
            ).scalars()
            assert list(indexes) == ["events_in_attempts_at_idx", "events_in_attempts_pkey"]
        migrate.downgrade(database_url, names, "0001")
        assert migrate.status(database_url, names).current == "0001"
        with engine.connect() as connection:
            columns = connection.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = :s AND table_name = 'events_out_relays' "
                    "ORDER BY ordinal_position"
                ),
                {"s": schema},
            ).scalars()
            assert list(columns) == ["relay_id", "host", "pid", "started_at", "heartbeat_at"]
            attempts = connection.execute(
                text(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = :s "
                    "AND tablename = 'events_in_attempts'"
                ),
                {"s": schema},
            ).scalar_one()
            assert attempts == 0
            kept = connection.execute(
                text(f'SELECT relay_id FROM "{schema}".events_out_relays')
            ).scalars()
            assert list(kept) == ["r1"]
    finally:
        drop_schema(engine, schema)


def test_longest_names_leave_room_for_every_derived_name() -> None:
    """Every table, index and constraint name stays within PostgreSQL's 63 bytes."""
    longest = build_tables("s" * 44, "o" * 44, "i" * 43 + "x")
    derived = [longest.version_table]
    for table in longest.metadata.tables.values():
        derived.append(table.name)
        derived.extend(str(index.name) for index in table.indexes)
        derived.extend(str(constraint.name) for constraint in table.constraints)
    assert max(len(name) for name in derived) <= 63


def test_cli_errors_are_sentences(database_url: str) -> None:
    unreachable = run_postroom(
        "db", "check", "--database-url", "postgresql://nobody:s3cret@127.0.0.1:1/none"
    )
    assert unreachable.returncode == 3
    assert "cannot reach PostgreSQL at nobody@127.0.0.1:1/none" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr + unreachable.stdout
    assert "Traceback" not in unreachable.stderr
    bad_name = run_postroom("db", "upgrade", "--schema", "Bad-Name", "--database-url", database_url)
    assert bad_name.returncode == 2  # bad usage: a setting postroom cannot use
    assert "not a valid name" in bad_name.stderr


USER_ENV = """
from alembic import context
from sqlalchemy import MetaData

import postroom.schema

user_metadata = MetaData()
postroom_tables = postroom.schema.build_tables({schema!r}, metadata=user_metadata)
connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=user_metadata,
    version_table_schema={schema!r},
    include_schemas=True,
    compare_server_default=True,
    include_name=lambda name, kind, parent: kind != "schema" or name == {schema!r},
)
with context.begin_transaction():
    context.run_migrations()
"""

USER_MIGRATION = '''
"""Add postroom's tables to the application's own history."""
from alembic import op

import postroom.schema

revision = "app0001"
down_revision = None


def upgrade():
    op.execute("CREATE TABLE {schema}.orders (id int primary key)")
    postroom.schema.upgrade_ops(op, postroom.schema.build_tables({schema!r}))


def downgrade():
    postroom.schema.downgrade_ops(op, postroom.schema.build_tables({schema!r}))
    op.execute("DROP TABLE {schema}.orders")
'''


def test_tables_in_the_users_own_alembic_history(
    tmp_path: Path, database_url: str, engine: Engine
) -> None:
    """A user's migration calls upgrade_ops; autogenerate then sees nothing left to do."""
    from alembic import command
    from alembic.config import Config

    schema = unique_schema()
    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(textwrap.dedent(USER_ENV.format(schema=schema)))
    (scripts / "versions" / "app0001.py").write_text(USER_MIGRATION.format(schema=schema))
    (scripts / "script.py.mako").write_text("")
    config = Config()
    config.set_main_option("script_location", str(scripts))
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        with engine.connect() as connection:
            user_metadata = MetaData()
            Table("orders", user_metadata, Column("id", Integer, primary_key=True), schema=schema)
            build_tables(schema, metadata=user_metadata)
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_schemas": True,
                    "compare_server_default": True,
                    "version_table_schema": schema,
                    "include_name": lambda name, kind, parent: kind != "schema" or name == schema,
                },
            )
            assert compare_metadata(context, user_metadata) == []
            found = connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = :s ORDER BY 1"),
                {"s": schema},
            ).scalars()
            assert list(found) == [
                "alembic_version",
                "inbox",
                "inbox_attempts",
                "orders",
                "outbox",
                "outbox_partitions",
                "outbox_relays",
            ]
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        with engine.connect() as connection:
            left = connection.execute(
                text(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = :s AND tablename <> "
                    "'alembic_version'"
                ),
                {"s": schema},
            ).scalar_one()
            assert left == 0
    finally:
        drop_schema(engine, schema)


def test_unknown_revision_in_upgrade_ops_is_an_error() -> None:
    import postroom.schema

    with pytest.raises(ValueError, match="unknown postroom schema revision"):
        postroom.schema.upgrade_ops(object(), build_tables("x"), after="9999")
