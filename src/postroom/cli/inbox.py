"""``postroom inbox``: what each consumer has handled; forget entries; purge old ones."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from postroom.cli.common import console, fail, with_settings
from postroom.cli.output import (
    EXIT_USAGE,
    DryRun,
    Json,
    Yes,
    age,
    confirm,
    connect,
    describe,
    duration,
    nothing_matches,
    print_json,
    say,
    seconds_between,
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

#: Entries shown (and put in ``--json``'s ``sample``) before a change.
SAMPLE_ROWS = 20

MessageIds = Annotated[
    list[str] | None,
    typer.Argument(
        help="Message ids as the consumer recorded them.", metavar="ID", show_default=False
    ),
]
OlderThan = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        envvar="POSTROOM_INBOX_OLDER_THAN",
        metavar="DURATION",
        help="Only entries processed longer ago than this: 30s, 5m, 24h, 7d.",
        show_default=False,
    ),
]
NewerThan = Annotated[
    str | None,
    typer.Option(
        "--newer-than",
        envvar="POSTROOM_INBOX_NEWER_THAN",
        metavar="DURATION",
        help="Only entries processed within this long: 30s, 5m, 24h, 7d.",
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


def _params(
    consumer: str | None,
    message_ids: list[str] | None,
    older_than: str | None,
    newer_than: str | None,
) -> dict[str, Any]:
    if consumer is not None and not consumer.strip():
        # An empty name must never widen the command to every consumer.
        fail("--consumer is empty; give the consumer's name, e.g. --consumer billing", EXIT_USAGE)
    return {
        "consumers": [consumer] if consumer is not None else None,
        "message_ids": message_ids or None,
        "older_than": duration(older_than, "--older-than"),
        "newer_than": duration(newer_than, "--newer-than"),
    }


def _words(
    consumer: str | None,
    message_ids: list[str] | None,
    older_than: str | None,
    newer_than: str | None,
) -> dict[str, Any]:
    return {
        "consumer": consumer,
        "message id": message_ids,
        "processed more than": f"{older_than} ago" if older_than else None,
        "processed within": newer_than,
    }


def _where(settings: Settings) -> str:
    return f"{quoted_table(tables_for(settings).inbox)} at {describe_url(settings.database_url)}"


def _entry_json(row: tuple[Any, ...], now: datetime) -> dict[str, Any]:
    consumer, message_id, processed_at = row
    return {
        "consumer": consumer,
        "message_id": message_id,
        "processed_at": processed_at,
        "age_seconds": seconds_between(now, processed_at),
    }


def _entries_table(title: str | None, rows: list[tuple[Any, ...]], now: datetime) -> Any:
    return table(
        title,
        ["message id", "consumer", "processed", "age"],
        [(m, c, p, age(seconds_between(now, p))) for c, m, p in rows],
    )


@app.command("ls")
@with_settings()
def list_entries(
    consumer: Annotated[
        str | None,
        _consumer_option("The consumer whose entries to list; without it, a summary per consumer."),
    ] = None,
    message_ids: MessageIds = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    newest: Annotated[
        bool,
        typer.Option(
            "--newest/--oldest",
            envvar="POSTROOM_INBOX_NEWEST",
            help="Most recently processed first (the default), or oldest first.",
        ),
    ] = True,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", "-n", envvar="POSTROOM_INBOX_LIMIT", min=1, help="Show at most this many."
        ),
    ] = 50,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Without --consumer: each consumer's number of entries and their age range. With it:
    the messages that consumer handled, most recent first.

    Give message ids to check whether the consumer handled those messages.
    """
    tables = tables_for(settings)
    params = {**_params(consumer, message_ids, older_than, newer_than), "limit": limit}
    with connect(settings) as connection:
        now_row = connection.execute("SELECT now()").fetchone()
        assert now_row is not None
        now: datetime = now_row[0]
        if consumer is None:
            summary = connection.execute(sql.inbox_summary_sql(tables), params).fetchall()
        else:
            matched = connection.execute(sql.inbox_count_sql(tables), params).fetchone()
            rows = connection.execute(
                sql.inbox_rows_sql(tables, newest_first=newest), params
            ).fetchall()
    words = _words(consumer, message_ids, older_than, newer_than)
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
            print_json({"consumers": consumers})
        elif not consumers:
            say(f"No inbox entries match ({describe(words)}).")
        else:
            console.print(
                table(
                    f"Inbox {_where(settings)}",
                    ["consumer", "entries", "oldest", "newest"],
                    [
                        (
                            c["consumer"],
                            c["entries"],
                            f"{age(seconds_between(now, c['oldest_processed_at']))} ago",
                            f"{age(seconds_between(now, c['newest_processed_at']))} ago",
                        )
                        for c in consumers
                    ],
                )
            )
        return
    assert matched is not None
    order = "newest first" if newest else "oldest first"
    if as_json:
        print_json(
            {
                "consumer": consumer,
                "matched": matched[0],
                "shown": len(rows),
                "order": order,
                "entries": [_entry_json(r, now) for r in rows],
            }
        )
        return
    if not rows:
        say(f"No inbox entries match ({describe(words)}).")
        return
    console.print(_entries_table(None, list(rows), now))
    more = "; raise --limit to see more" if matched[0] > len(rows) else ""
    say(f"{len(rows)} of {matched[0]} matching entries, {order}{more}.")


def _delete(
    *,
    settings: Settings,
    verb: str,
    params: dict[str, Any],
    words: dict[str, Any],
    dry_run: bool,
    yes: bool,
    as_json: bool,
    done: str,
) -> None:
    tables = tables_for(settings)
    with connect(settings) as connection:
        now_row = connection.execute("SELECT now()").fetchone()
        assert now_row is not None
        now: datetime = now_row[0]
        counted = connection.execute(sql.inbox_count_sql(tables), params).fetchone()
        matched = int(counted[0]) if counted else 0
        if matched == 0:
            nothing_matches("inbox entries", words, as_json=as_json, dry_run=dry_run, changed=0)
        sample = connection.execute(
            sql.inbox_rows_sql(tables, newest_first=False),
            {**params, "limit": SAMPLE_ROWS},
        ).fetchall()
        document = {
            "dry_run": dry_run,
            "matched": matched,
            "changed": 0,
            "sample": [_entry_json(r, now) for r in sample],
        }
        if not as_json:
            shown = f"first {len(sample)} of {matched}" if matched > len(sample) else str(matched)
            console.print(_entries_table(f"Inbox entries to {verb} ({shown})", list(sample), now))
        if dry_run:
            if as_json:
                print_json(document)
            else:
                say(f"Dry run: would {verb} {matched} inbox entries; nothing changed.")
            return
        confirm(f"{verb.capitalize()} {matched} inbox entries in {_where(settings)}?", yes=yes)
        changed = 0
        statement = sql.inbox_delete_batch_sql(tables)
        while True:
            with connection.transaction():
                count = connection.execute(
                    statement, {**params, "limit": sql.DELETE_BATCH}
                ).rowcount
            changed += count
            if count == 0:
                break
    if as_json:
        print_json({**document, "changed": changed})
    else:
        say(done.format(changed=changed))


@app.command()
@with_settings()
def forget(
    consumer: Annotated[str, _consumer_option("The consumer whose entries to forget.")],
    message_ids: MessageIds = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            envvar="POSTROOM_INBOX_ALL",
            help="Without ids or a time filter: forget every entry of the consumer.",
        ),
    ] = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Forget that a consumer handled some messages, so it handles them again when they
    are delivered again (for example after `postroom outbox replay`).

    Choose the entries by message id or by when they were processed.
    """
    if not (message_ids or older_than or newer_than or everything):
        fail(
            "say which entries to forget: give message ids, --older-than or --newer-than, "
            f"or --all for every entry of {consumer!r}",
            EXIT_USAGE,
        )
    _delete(
        settings=settings,
        verb="forget",
        params=_params(consumer, message_ids, older_than, newer_than),
        words=_words(consumer, message_ids, older_than, newer_than),
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        done=(
            "Forgot {changed} inbox entries: "
            f"{consumer} handles those messages again if they are delivered again."
        ),
    )


@app.command()
@with_settings()
def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            envvar="POSTROOM_INBOX_PURGE_OLDER_THAN",
            metavar="DURATION",
            help="Delete entries processed longer ago than this: 30s, 5m, 24h, 7d.",
            show_default=False,
        ),
    ],
    consumer: Annotated[
        str | None, _consumer_option("Only this consumer's entries (default: all).")
    ] = None,
    dry_run: DryRun = False,
    yes: Yes = False,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Delete inbox entries processed longer ago than --older-than, in batches of 5,000.

    A message redelivered after its entry is gone is handled again: keep entries longer
    than the longest redelivery or replay window (consumers purge after
    POSTROOM_INBOX_RETENTION, 7d by default, by themselves).
    """
    _delete(
        settings=settings,
        verb="delete",
        params=_params(consumer, None, older_than, None),
        words=_words(consumer, None, older_than, None),
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        done="Deleted {changed} inbox entries.",
    )
