"""The root ``postroom`` command: its subcommands, ``--version`` and ``--debug``."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Annotated

import typer

from postroom.cli import broker, db, dead_letter, inbox, outbox
from postroom.cli.boundary import EXIT_CODES, PostroomGroup, unexpected
from postroom.cli.consume import consume
from postroom.cli.relay import relay

app = typer.Typer(
    name="postroom",
    cls=PostroomGroup,
    help=(
        "postroom: transactional outbox and inbox for PostgreSQL with RabbitMQ and Kafka.\n\n"
        "Every option can also be set with the POSTROOM_* environment variable shown beside it; "
        "commands that use the database need POSTROOM_DATABASE_URL (or --database-url).\n\n"
        f"{EXIT_CODES}"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
app.add_typer(db.app, name="db")
app.add_typer(outbox.app, name="outbox")
app.add_typer(inbox.app, name="inbox")
app.add_typer(dead_letter.app, name="dead-letter")
app.add_typer(broker.app, name="broker")
app.command()(relay)
app.command()(consume)


def version() -> str:
    """The installed postroom's version (``unknown`` when it is not installed)."""
    try:
        return metadata.version("postroom")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"postroom {version()}")
        raise typer.Exit(0)


@app.callback()
def root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="POSTROOM_DEBUG",
            help="Print the traceback of an error, not only its one-line sentence.",
        ),
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print postroom's version and exit.",
        ),
    ] = False,
) -> None:
    """postroom: transactional outbox and inbox for PostgreSQL with RabbitMQ and Kafka."""


def main() -> None:
    """Entry point of the ``postroom`` console script.

    Commands report their own errors (:class:`PostroomGroup`); what fails before a command
    runs (building the command line itself) is reported here the same way.
    """
    try:
        app()
    except Exception as exc:
        debugging = os.environ.get("POSTROOM_DEBUG", "").lower() in {"1", "true", "yes", "on"}
        sys.exit(unexpected(exc, debugging))
