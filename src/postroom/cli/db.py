"""``postroom db``: create and upgrade postroom's tables, check them, print their DDL, and
grant each process the rights it needs on them."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from postroom.cli.common import (
    EXIT_CHECK_FAILED,
    EXIT_REFUSED,
    EXIT_USAGE,
    console,
    error_console,
    fail,
    user_errors,
    with_settings,
)
from postroom.cli.options import Yes
from postroom.config import Settings
from postroom.database import create_engine, readable_errors, translate
from postroom.errors import (
    ConfigurationError,
    DatabaseError,
    SchemaMissingError,
)
from postroom.schema import grants, migrate
from postroom.schema.tables import tables_for
from postroom.urls import describe_url, scrub

app = typer.Typer(
    help="Create, upgrade and check postroom's tables (outbox and inbox), and grant each "
    "process the rights it needs on them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

Revision = Annotated[
    str, typer.Argument(help="Target revision; 'head' is the newest this version ships.")
]


@app.command()
@with_settings()
def upgrade(revision: Revision = "head", *, settings: Settings) -> None:
    """Create postroom's tables, or bring them up to date. Safe to run again, and from
    several deploys at once (they take turns on an advisory lock)."""
    with user_errors():
        migrate.check_revision(revision)
        before = migrate.status(settings.database_url, tables_for(settings))
        after = migrate.upgrade(settings.database_url, tables_for(settings), revision)
    where = f"{describe_url(settings.database_url)} schema {settings.schema}"
    if before.current == after.current:
        console.print(f"postroom tables already at revision {after.current} in {where}")
    else:
        console.print(
            f"postroom tables upgraded from {before.current or 'nothing'} "
            f"to {after.current} in {where}"
        )


CheckedRole = Annotated[
    grants.Role | None,
    typer.Option(
        "--role",
        envvar="POSTROOM_CHECK_ROLE",
        help="Also check that the connected role has every right this process needs "
        "(writer, relay, consumer or operator).",
        show_default=False,
    ),
]


@app.command()
@with_settings()
def check(role: CheckedRole = None, *, settings: Settings) -> None:
    """Exit 0 if postroom's tables are up to date, 1 if they are missing or behind.

    With --role, also exit 1 if the connected role lacks a right that process needs, each
    named with the GRANT that gives it. Use it as a deploy gate before starting relays
    and consumers.
    """
    with user_errors():
        if role is grants.Role.MIGRATOR:
            raise ConfigurationError(
                "the migrator owns postroom's tables rather than being granted rights, so "
                "--role migrator cannot be checked; use --role writer, relay, consumer or "
                "operator"
            )
    where = f"{describe_url(settings.database_url)} schema {settings.schema}"
    if role is not None:
        _check_rights(settings, role, where)
        if not grants.reads_revision(role):
            console.print(
                f"the {role} does not read postroom's revision; check it with `postroom db "
                "check` as a relay, consumer, operator or the migrator"
            )
            return
    with user_errors():
        state = migrate.status(settings.database_url, tables_for(settings))
    if state.up_to_date:
        console.print(f"postroom tables are up to date (revision {state.head}) in {where}")
        return
    found = f"at revision {state.current}" if state.current else "missing"
    error_console.print(
        f"postroom tables are {found} in {where}; this version needs revision {state.head}. "
        "Run `postroom db upgrade`."
    )
    raise typer.Exit(EXIT_CHECK_FAILED)


def _check_rights(settings: Settings, role: grants.Role, where: str) -> None:
    """Say whether the connected role has every right ``role`` needs; exit 1 if not.

    Missing tables are left to the schema check that follows (it exits 1 for them too).
    """
    with user_errors():
        try:
            rights = grants.check_rights(settings.database_url, tables_for(settings), role)
        except SchemaMissingError:
            return
    for sentence in rights.sentences():
        error_console.print(sentence, markup=False)
    if rights.missing:
        raise typer.Exit(EXIT_CHECK_FAILED)
    console.print(f"role {rights.user!r} has every right the {role} needs in {where}")


def _role_option(role: grants.Role) -> Any:
    return typer.Option(
        f"--{role}",
        envvar=f"POSTROOM_GRANTS_{role.upper()}",
        metavar="ROLE",
        help=f"The PostgreSQL role the {role} runs as.",
        show_default=False,
    )


@app.command(name="grants")
@with_settings()
def grants_command(
    writer: Annotated[str | None, _role_option(grants.Role.WRITER)] = None,
    relay: Annotated[str | None, _role_option(grants.Role.RELAY)] = None,
    consumer: Annotated[str | None, _role_option(grants.Role.CONSUMER)] = None,
    operator: Annotated[str | None, _role_option(grants.Role.OPERATOR)] = None,
    migrator: Annotated[str | None, _role_option(grants.Role.MIGRATOR)] = None,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            envvar="POSTROOM_GRANTS_APPLY",
            help="Run the statements (in one transaction) instead of printing them.",
        ),
    ] = False,
    *,
    settings: Settings,
) -> None:
    """Print the GRANT statements that give each named role exactly the rights its process
    needs on postroom's tables (the migrator: ownership), or run them with --apply.

    Each role first loses every right on postroom's tables, then gets what it needs. The
    roles must exist. Run it again after `db upgrade` when a new version adds tables.
    """
    named = {
        grants.Role.WRITER: writer,
        grants.Role.RELAY: relay,
        grants.Role.CONSUMER: consumer,
        grants.Role.OPERATOR: operator,
        grants.Role.MIGRATOR: migrator,
    }
    with user_errors():
        if not any(named.values()):
            raise ConfigurationError(
                "name at least one role to grant to, e.g. --writer app --relay postroom_relay "
                "--consumer postroom_consumer --operator postroom_operator --migrator "
                "postroom_owner"
            )
        tables = tables_for(settings)
        statements = [
            statement
            for role, name in named.items()
            if name
            for statement in grants.grant_statements(tables, role, name)
        ]
    if not apply:
        typer.echo("\n".join(statements))
        return
    with user_errors():
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            with readable_errors(settings.database_url), engine.begin() as connection:
                for statement in statements:
                    _run_grant(connection, statement, settings.database_url)
        finally:
            engine.dispose()
    where = f"{describe_url(settings.database_url)} schema {settings.schema}"
    roles = ", ".join(f"{name} ({role})" for role, name in named.items() if name)
    console.print(f"granted postroom's rights to {roles} in {where}", markup=False)


@app.command()
@with_settings()
def sql(revision: Revision = "head", *, settings: Settings) -> None:
    """Print the DDL that `db upgrade` would run, without touching the database.

    Hand it to a DBA or apply it with psql; it records the revision like `db upgrade` does.
    """
    with user_errors():
        migrate.check_revision(revision)
        typer.echo(migrate.offline_sql(tables_for(settings), revision), nl=False)


@app.command()
@with_settings()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Revision to go back to; 'base' drops all.")],
    yes: Yes = False,
    *,
    settings: Settings,
) -> None:
    """Revert postroom's tables to an earlier revision; 'base' DROPS them and their rows.

    Asks first; without a terminal it refuses (exit 2) unless given --yes.
    """
    with user_errors():
        migrate.check_revision(revision)
        where = f"{describe_url(settings.database_url)} schema {settings.schema}"
    if not yes:
        _confirm(f"Revert postroom's tables in {where} to {revision}?")
    with user_errors():
        migrate.downgrade(settings.database_url, tables_for(settings), revision)
    console.print(f"postroom tables reverted to {revision} in {where}")


def _run_grant(connection: Connection, statement: str, database_url: str) -> None:
    """Run one statement of `db grants --apply`; a refusal says which and what to do."""
    try:
        connection.exec_driver_sql(statement)
    except sa_exc.ProgrammingError as exc:
        known = translate(exc, database_url)
        if isinstance(known, SchemaMissingError):
            raise known from exc
        said = scrub(str(exc.orig).strip(), database_url).splitlines()[0]
        raise DatabaseError(
            f"the database refused {statement.rstrip(';')} ({said}); create the roles first "
            "and run `db grants --apply` as the owner of postroom's tables or a superuser"
        ) from exc


def _confirm(question: str) -> None:
    """Go on if the person at the terminal agrees; refuse (exit 2) without a terminal."""
    if not sys.stdin.isatty():
        fail(
            "not reverting postroom's tables without confirmation, and there is no terminal "
            "to ask: run it again with --yes (or POSTROOM_YES=true) to go ahead",
            EXIT_USAGE,
        )
    if not typer.confirm(question, default=False, err=True):
        error_console.print("Nothing changed.")
        raise typer.Exit(EXIT_REFUSED)
