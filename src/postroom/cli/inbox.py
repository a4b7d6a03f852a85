"""``postroom inbox``: what each consumer has handled; forget entries; purge old ones."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import typer

from postroom.cli.changes import Mode, Statements, Wording, change_rows, with_mode
from postroom.cli.common import console, fail, with_settings
from postroom.cli.ids import (
    consumer_name,
    inbox_message_ids,
    require_inbox_consumer,
    require_inbox_ids,
)
from postroom.cli.options import (
    InboxAll,
    InboxLimit,
    InboxNewerThan,
    InboxOlderThan,
    Json,
    newest,
    since,
)
from postroom.cli.output import (
    EXIT_USAGE,
    age,
    connect,
    describe,
    duration,
    list_json,
    now,
    print_json,
    query,
    say,
    scalar,
    seconds_between,
    show_listing,
    table,
)
from postroom.config import Settings
from postroom.schema import operations_sql as sql
from postroom.schema.sql import quoted_table
from postroom.schema.tables import tables_for
from postroom.urls import describe_url

app = typer.Typer(
    help=(
        "See which messages each consumer has handled (its inbox), forget entries so a "
        "message is processed again, and purge old entries.\n\n"
        "Commands that change rows take **--dry-run**, say how many rows they will touch "
        "and ask first (**--yes** to skip the question; required without a terminal). "
        "A filter that matches nothing says so and exits 0."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

MessageIds = Annotated[
    list[str] | None,
    typer.Argument(
        help=(
            "Message ids as the consumer recorded them: the postroom-id of the logs (any "
            "spelling of the UUID), or another producer's id."
        ),
        metavar="ID",
        show_default=False,
    ),
]


def _consumer_option(help: str) -> Any:
    return typer.Option(
        "--consumer",
        "-c",
        envvar="POSTROOM_INBOX_CONSUMER",
        metavar="NAME",
        help=help,
        show_default=False,
    )


@dataclass(frozen=True)
class _Filter:
    """Which inbox entries an operator asked for."""

    consumer: str | None
    message_ids: list[str] | None = None
    older_than: str | None = None
    newer_than: str | None = None

    def params(self) -> dict[str, Any]:
        """The statement parameters (durations in seconds, ids as the inbox records them);
        a consumer name or an id that cannot be one exits 2."""
        return {
            "consumers": [consumer_name(self.consumer)] if self.consumer is not None else None,
            "message_ids": inbox_message_ids(self.message_ids),
            "older_than": duration(self.older_than, "--older-than"),
            "newer_than": duration(self.newer_than, "--newer-than"),
        }

    def words(self) -> dict[str, Any]:
        """The filter, for sentences."""
        return {
            "consumer": self.consumer,
            "message id": self.message_ids,
            "processed more than": f"{self.older_than} ago" if self.older_than else None,
            "processed within": self.newer_than,
        }


def _where(settings: Settings) -> str:
    return f"{quoted_table(tables_for(settings).inbox)} at {describe_url(settings.database_url)}"


def _entry_json(row: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    return {**row, "age_seconds": seconds_between(at, row["processed_at"])}


def _entries_table(title: str | None, rows: Sequence[Mapping[str, Any]], at: datetime) -> Any:
    return table(
        title,
        ["message id", "consumer", "processed", "age"],
        [
            (r["message_id"], r["consumer"], r["processed_at"], _ago(at, r["processed_at"]))
            for r in rows
        ],
        free={"message id", "consumer"},
    )


def _ago(at: datetime, then: datetime) -> str:
    return f"{age(seconds_between(at, then))} ago"


@app.command("ls")
@with_settings()
def list_entries(
    consumer: Annotated[
        str | None,
        _consumer_option("The consumer whose entries to list; without it, a summary per consumer."),
    ] = None,
    message_ids: MessageIds = None,
    older_than: InboxOlderThan = None,
    newer_than: InboxNewerThan = None,
    newest_first: Annotated[
        bool,
        newest(
            "POSTROOM_INBOX_NEWEST", "Most recently processed first (the default), or oldest first."
        ),
    ] = True,
    limit: InboxLimit = 50,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Without --consumer: each consumer's number of entries and their age range. With it:
    the messages that consumer handled, most recent first.

    Give message ids to check whether the consumer handled those messages.
    """
    tables = tables_for(settings)
    flt = _Filter(consumer, message_ids, older_than, newer_than)
    params = {**flt.params(), "limit": limit}
    with connect(settings) as connection:
        at = now(connection)
        if consumer is None:
            summary = connection.execute(sql.inbox_summary_sql(tables), params).fetchall()
        else:
            matched = int(scalar(connection, sql.inbox_count_sql(tables), params))
            rows = query(connection, sql.inbox_rows_sql(tables, newest_first=newest_first), params)
    if consumer is None:
        consumers = [
            {
                "consumer": name,
                "entries": count,
                "oldest_processed_at": oldest,
                "newest_processed_at": latest,
            }
            for name, count, oldest, latest in summary
        ]
        if as_json:
            print_json(list_json(consumers, len(consumers)))
        elif not consumers:
            say(f"No inbox entries match ({describe(flt.words())}).")
        else:
            console.print(
                table(
                    f"Inbox {_where(settings)}",
                    ["consumer", "entries", "oldest", "newest"],
                    [
                        (
                            c["consumer"],
                            c["entries"],
                            _ago(at, c["oldest_processed_at"]),
                            _ago(at, c["newest_processed_at"]),
                        )
                        for c in consumers
                    ],
                    free={"consumer"},
                )
            )
        return
    items = [_entry_json(r, at) for r in rows]
    listing = _entries_table(None, rows, at)
    words = flt.words()
    show_listing(
        listing,
        items,
        matched,
        newest_first,
        as_json,
        what=("inbox", "entries"),
        filters=words,
        head={"consumer": consumer},
    )


def _delete(
    settings: Settings, verb: str, flt: _Filter, mode: Mode, done: Callable[[int], str]
) -> None:
    """Delete the entries ``flt`` selects with :func:`~postroom.cli.changes.change_rows`."""
    tables = tables_for(settings)
    change_rows(
        settings,
        Wording("inbox entries", verb, flt.words(), f"in {_where(settings)}"),
        mode,
        Statements(
            sql.inbox_count_sql(tables),
            sql.inbox_rows_sql(tables, newest_first=False),
            sql.inbox_delete_batch_sql(tables),
            sql.DELETE_BATCH,
        ),
        flt.params(),
        preview=_entries_table,
        item_json=_entry_json,
        done=lambda changed: [done(changed)],
    )


@app.command()
@with_settings()
@with_mode
def forget(
    consumer: Annotated[str, _consumer_option("The consumer whose entries to forget.")],
    message_ids: MessageIds = None,
    older_than: InboxOlderThan = None,
    newer_than: InboxNewerThan = None,
    everything: InboxAll = False,
    *,
    mode: Mode,
    settings: Settings,
) -> None:
    """Forget that a consumer handled some messages, so it handles them again when they
    are delivered again (for example after `postroom outbox replay`).

    Choose the entries by message id or by when they were processed.
    """
    flt = _Filter(consumer, message_ids, older_than, newer_than)
    params = flt.params()  # bad names and ids exit 2 before anything else
    if not (message_ids or older_than or newer_than or everything):
        fail(
            "say which entries to forget: give message ids, --older-than or --newer-than, "
            f"or --all for every entry of {consumer!r}",
            EXIT_USAGE,
        )
    tables = tables_for(settings)
    with connect(settings) as connection:
        require_inbox_consumer(connection, tables, consumer, _where(settings))
        if params["message_ids"]:
            require_inbox_ids(
                connection, tables, consumer, params["message_ids"], "nothing was forgotten"
            )
    _delete(
        settings,
        "forget",
        flt,
        mode,
        lambda changed: (
            f"Forgot {changed} inbox entries: "
            f"{consumer} handles those messages again if they are delivered again."
        ),
    )


@app.command()
@with_settings()
@with_mode
def purge(
    older_than: Annotated[
        str,
        since(
            "--older-than",
            "POSTROOM_INBOX_PURGE_OLDER_THAN",
            "Delete entries processed longer ago than this",
        ),
    ],
    consumer: Annotated[
        str | None, _consumer_option("Only this consumer's entries (default: all).")
    ] = None,
    *,
    mode: Mode,
    settings: Settings,
) -> None:
    """Delete inbox entries processed longer ago than --older-than, in batches of 5,000.

    A message redelivered after its entry is gone is handled again: keep entries longer
    than the longest redelivery or replay window (consumers purge after
    POSTROOM_INBOX_RETENTION, 7d by default, by themselves).
    """
    _delete(
        settings,
        "delete",
        _Filter(consumer, older_than=older_than),
        mode,
        lambda changed: f"Deleted {changed} inbox entries.",
    )
