"""The rights `postroom db grants` gives each process, built from the tables' names."""

from __future__ import annotations

import pytest

from postroom.errors import ConfigurationError
from postroom.schema import build_tables
from postroom.schema.grants import Role, grant_statements, rights_for


def test_every_granted_role_first_loses_every_right_on_each_postroom_table() -> None:
    tables = build_tables("billing", "events", "seen")
    for role in (Role.WRITER, Role.RELAY, Role.CONSUMER, Role.OPERATOR):
        revokes = [s for s in grant_statements(tables, role, "r") if s.startswith("REVOKE")]
        assert revokes == [
            f'REVOKE ALL ON TABLE "billing"."{name}" FROM "r";'
            for name in (
                "events",
                "seen",
                "events_partitions",
                "events_relays",
                "seen_attempts",
                "events_alembic_version",
            )
        ]


def test_the_consumer_may_lock_the_rows_its_purges_delete() -> None:
    rights = {r.describe() for r in rights_for(build_tables("s"), Role.CONSUMER)}
    assert 'UPDATE on table "s"."inbox"' in rights
    assert 'UPDATE on table "s"."inbox_attempts"' in rights
    assert 'INSERT on table "s"."outbox"' in rights
    assert 'SELECT on table "s"."outbox"' not in rights


def test_the_writer_only_inserts_into_the_outbox() -> None:
    rights = [r.describe() for r in rights_for(build_tables("s"), Role.WRITER)]
    assert rights == ['USAGE on schema "s"', 'INSERT on table "s"."outbox"']


def test_the_migrator_owns_the_tables_and_may_grant_usage() -> None:
    statements = grant_statements(build_tables("s"), Role.MIGRATOR, 'o"wner')
    assert 'GRANT USAGE ON SCHEMA "s" TO "o""wner" WITH GRANT OPTION;' in statements
    assert 'ALTER TABLE IF EXISTS "s"."outbox" OWNER TO "o""wner";' in statements
    assert rights_for(build_tables("s"), Role.MIGRATOR) == []


def test_a_role_name_postgresql_cannot_take_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a PostgreSQL role name"):
        grant_statements(build_tables("s"), Role.RELAY, "x" * 64)
