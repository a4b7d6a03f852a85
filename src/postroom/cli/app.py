"""The root ``postroom`` command."""

from __future__ import annotations

import typer

from postroom.cli import broker, db, dead_letter, inbox, outbox
from postroom.cli.consume import consume
from postroom.cli.relay import relay

app = typer.Typer(
    name="postroom",
    help=(
        "postroom: transactional outbox and inbox for PostgreSQL with RabbitMQ and Kafka.\n\n"
        "Every option can also be set with the POSTROOM_* environment variable shown beside it. "
        "Exit codes: 0 success, 1 a check failed, 2 bad usage, 3 the operation failed."
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


def main() -> None:
    """Entry point of the ``postroom`` console script."""
    app()
