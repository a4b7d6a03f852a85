"""``postroom db``: create and upgrade postroom's tables, check them, print their DDL."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

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
from postroom.schema import migrate
from postroom.schema.tables import tables_for
from postroom.urls import describe_url

app = typer.Typer(
    help="Create, upgrade and check postroom's tables (outbox and inbox).",
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


@app.command()
@with_settings()
def check(*, settings: Settings) -> None:
    """Exit 0 if postroom's tables are up to date, 1 if they are missing or behind.

    Use it as a deploy gate before starting relays and consumers.
    """
    with user_errors():
        state = migrate.status(settings.database_url, tables_for(settings))
    where = f"{describe_url(settings.database_url)} schema {settings.schema}"
    if state.up_to_date:
        console.print(f"postroom tables are up to date (revision {state.head}) in {where}")
        return
    found = f"at revision {state.current}" if state.current else "missing"
    error_console.print(
        f"postroom tables are {found} in {where}; this version needs revision {state.head}. "
        "Run `postroom db upgrade`."
    )
    raise typer.Exit(EXIT_CHECK_FAILED)


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
