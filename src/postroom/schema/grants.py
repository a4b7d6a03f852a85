"""The rights each kind of postroom process needs on its tables: as GRANT statements a DBA
can run, and as one query that tells which of them the connected role lacks.

Built from :class:`~postroom.schema.tables.Tables`, so custom schema and table names get
the same rights; every name is quoted. The writer is the application that calls
``enqueue()``; the operator is the person running the ``outbox``, ``inbox`` and
``db check`` commands; the migrator runs ``db upgrade`` and owns the schema and tables.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text

from postroom.database import create_engine, readable_errors
from postroom.errors import ConfigurationError, MissingRightsError, SchemaMissingError
from postroom.schema.sql import quote_identifier, quoted_table
from postroom.schema.tables import Tables


class Role(enum.StrEnum):
    """A kind of postroom process, each needing its own rights."""

    WRITER = "writer"
    RELAY = "relay"
    CONSUMER = "consumer"
    OPERATOR = "operator"
    MIGRATOR = "migrator"


_ALL = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True)
class Right:
    """One privilege on one object: ``USAGE`` on the schema (``table`` None), or a table
    privilege."""

    privilege: str
    schema: str | None
    table: str | None = None

    @property
    def on_schema(self) -> bool:
        """True for a right on the schema itself."""
        return self.table is None

    @property
    def target(self) -> str:
        """The object's quoted name (``"postroom"`` or ``"postroom"."outbox"``)."""
        names = [name for name in (self.schema, self.table) if name is not None]
        return ".".join(quote_identifier(name) for name in names)

    @property
    def object_kind(self) -> str:
        """``SCHEMA`` or ``TABLE``, as GRANT spells it."""
        return "SCHEMA" if self.on_schema else "TABLE"

    def grant(self, role_name: str) -> str:
        """The statement that gives this right to ``role_name``."""
        return (
            f"GRANT {self.privilege} ON {self.object_kind} {self.target} "
            f"TO {quote_identifier(role_name)};"
        )

    def describe(self) -> str:
        """``INSERT on table "postroom"."outbox"``, for messages."""
        return f"{self.privilege} on {self.object_kind.lower()} {self.target}"


def version_table(tables: Tables) -> str:
    """The quoted name of the table that records the migrations' revision."""
    name = quote_identifier(tables.version_table)
    return f"{quote_identifier(tables.schema)}.{name}" if tables.schema else name


def postroom_tables(tables: Tables) -> list[str]:
    """The quoted names of every table postroom creates, its version table included."""
    return [
        *(
            quoted_table(table)
            for table in (
                tables.outbox,
                tables.inbox,
                tables.partitions,
                tables.relays,
                tables.attempts,
            )
        ),
        version_table(tables),
    ]


def rights_for(tables: Tables, role: Role) -> list[Right]:
    """What a process of kind ``role`` needs, one privilege per entry (none for the migrator,
    which owns the tables)."""
    if role is Role.MIGRATOR:
        return []
    outbox = tables.outbox.name
    inbox = tables.inbox.name
    version = tables.version_table
    needs: dict[Role, list[tuple[str, Sequence[str]]]] = {
        Role.WRITER: [(outbox, ["INSERT"])],
        Role.RELAY: [
            (outbox, ["SELECT", "UPDATE", "DELETE"]),
            (tables.partitions.name, ["SELECT", "UPDATE"]),
            (tables.relays.name, _ALL),
            (version, ["SELECT"]),
        ],
        Role.CONSUMER: [
            # UPDATE: the purges lock the rows they delete (FOR UPDATE SKIP LOCKED).
            (inbox, _ALL),
            (tables.attempts.name, _ALL),
            (version, ["SELECT"]),
            # Handlers may enqueue follow-up messages in their transaction.
            (outbox, ["INSERT"]),
        ],
        Role.OPERATOR: [
            (outbox, ["SELECT", "UPDATE", "DELETE"]),
            (inbox, ["SELECT", "UPDATE", "DELETE"]),
            (tables.partitions.name, ["SELECT"]),
            (tables.relays.name, ["SELECT"]),
            (version, ["SELECT"]),
        ],
    }
    rights = [
        Right(privilege, tables.schema, table)
        for table, privileges in needs[role]
        for privilege in privileges
    ]
    if tables.schema:
        rights.insert(0, Right("USAGE", tables.schema))
    return rights


def reads_revision(role: Role) -> bool:
    """Whether ``role`` may read the migrations' revision (the writer never needs to)."""
    return role is not Role.WRITER


def grant_statements(tables: Tables, role: Role, role_name: str) -> list[str]:
    """The statements that leave ``role_name`` with exactly the rights ``role`` needs on
    postroom's tables: every right on them revoked first, then granted; the schema's other
    rights are left alone. The migrator may create in the schema and is made the tables'
    owner."""
    check_role_name(role_name)
    quoted_role = quote_identifier(role_name)
    targets = postroom_tables(tables)
    if role is Role.MIGRATOR:
        statements = []
        if tables.schema:
            schema = quote_identifier(tables.schema)
            statements += [
                f"CREATE SCHEMA IF NOT EXISTS {schema};",
                # The grant option lets the migrator give the other roles their USAGE.
                f"GRANT USAGE ON SCHEMA {schema} TO {quoted_role} WITH GRANT OPTION;",
                f"GRANT CREATE ON SCHEMA {schema} TO {quoted_role};",
            ]
        return statements + [f"ALTER TABLE IF EXISTS {t} OWNER TO {quoted_role};" for t in targets]
    revokes = [f"REVOKE ALL ON TABLE {target} FROM {quoted_role};" for target in targets]
    grants: dict[tuple[str, str], list[str]] = {}
    for right in rights_for(tables, role):
        grants.setdefault((right.object_kind, right.target), []).append(right.privilege)
    return revokes + [
        f"GRANT {', '.join(privileges)} ON {kind} {target} TO {quoted_role};"
        for (kind, target), privileges in grants.items()
    ]


def check_role_name(role_name: str) -> None:
    """Raise ConfigurationError unless ``role_name`` can name a PostgreSQL role."""
    if not role_name or len(role_name.encode()) > 63 or "\x00" in role_name:
        raise ConfigurationError(
            f"role name {role_name!r} is not a PostgreSQL role name; give 1 to 63 bytes, "
            "e.g. --relay postroom_relay"
        )


@dataclass(frozen=True)
class RightsCheck:
    """Which of the rights a process needs the connected role has."""

    role: Role
    user: str
    missing: list[Right]

    def sentences(self) -> list[str]:
        """One sentence per missing right, naming it and the GRANT that gives it."""
        return [
            f"role {self.user!r} lacks {right.describe()}, which the {self.role} needs; "
            f"grant it with: {right.grant(self.user)}"
            for right in self.missing
        ]


def check_rights(database_url: str, tables: Tables, role: Role) -> RightsCheck:
    """Ask the database, in one query, which rights ``role`` needs the connected user lacks."""
    rights = rights_for(tables, role)
    params: dict[str, str] = {}
    columns = ["current_user"]
    for n, right in enumerate(rights):
        params[f"p{n}"] = right.privilege
        params[f"s{n}"] = right.schema or ""
        schema = f"coalesce(nullif(:s{n}, ''), current_schema())"
        if right.table is None:
            columns.append(f"has_schema_privilege({schema}, :p{n})")
            continue
        # Found by OID through the catalogs: no USAGE on the schema is needed to look.
        params[f"t{n}"] = right.table
        columns.append(
            f"has_table_privilege((SELECT c.oid FROM pg_class AS c JOIN pg_namespace AS s "
            f"ON s.oid = c.relnamespace WHERE s.nspname = {schema} AND c.relname = :t{n}), "
            f":p{n})"
        )
    engine = create_engine(database_url, pool_size=1)
    try:
        with readable_errors(database_url), engine.connect() as connection:
            row = connection.execute(text(f"SELECT {', '.join(columns)}"), params).one()
    finally:
        engine.dispose()
    user, *granted = row
    absent = sorted(
        {right.target for right, has in zip(rights, granted, strict=True) if has is None}
    )
    if absent:
        raise SchemaMissingError(
            f"postroom's tables are missing ({', '.join(absent)} not found); create them "
            "with `postroom db upgrade`"
        )
    missing = [right for right, has in zip(rights, granted, strict=True) if not has]
    return RightsCheck(role, str(user), missing)


def require_rights(database_url: str, tables: Tables, role: Role) -> None:
    """Raise MissingRightsError, in one sentence, if the connected user lacks a right that
    ``role`` needs (so a process fails at start-up, not at its first write)."""
    result = check_rights(database_url, tables, role)
    if not result.missing:
        return
    names = ", ".join(right.describe() for right in result.missing)
    grants = " ".join(right.grant(result.user) for right in result.missing)
    raise MissingRightsError(
        f"role {result.user!r} lacks {names}, which the {role} needs; grant "
        f"{'it' if len(result.missing) == 1 else 'them'} with: {grants} "
        f"(or run `postroom db grants --{role} {result.user} --apply` as the tables' owner)"
    )
