"""``postroom outbox``: see what is stuck and why, retry it, replay it, purge old rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
import typer

from postroom.cli.changes import Mode, Statements, Wording, change_rows, with_mode
from postroom.cli.common import EXIT_CHECK_FAILED, error_console, with_settings
from postroom.cli.options import (
    Json,
    OutboxAll,
    OutboxLimit,
    OutboxNewerThan,
    OutboxOlderThan,
    newest,
    since,
    states,
)
from postroom.cli.outbox_select import (
    Error,
    Filter,
    Ids,
    Key,
    PurgeState,
    RetryState,
    State,
    Topic,
    guarded,
)
from postroom.cli.outbox_view import (
    Status,
    row_json,
    rows_table,
    show_row,
    status_json,
    status_text,
)
from postroom.cli.output import (
    age,
    connect,
    duration,
    failed,
    now,
    parse_uuid,
    payload_view,
    print_json,
    query,
    say,
    scalar,
    show_listing,
    timestamp,
)
from postroom.config import Settings
from postroom.schema import operations_sql as sql
from postroom.schema.sql import quoted_table
from postroom.schema.tables import DEAD, PENDING, PUBLISHED, Tables, tables_for
from postroom.urls import describe_url

app = typer.Typer(
    help=(
        "See the outbox's backlog and dead-lettered rows; retry, replay and purge them.\n\n"
        "Commands that change rows take **--dry-run**, say how many rows they will touch "
        "and ask first (**--yes** to skip the question; required without a terminal). "
        "A filter that matches nothing says so and exits 0."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _where(settings: Settings) -> str:
    return f"{quoted_table(tables_for(settings).outbox)} at {describe_url(settings.database_url)}"


def _read_status(settings: Settings) -> Status:
    tables = tables_for(settings)
    with connect(settings) as connection:
        counts = connection.execute(sql.state_counts_sql(tables)).fetchall()
        pending = connection.execute(sql.pending_summary_sql(tables)).fetchone()
        owners = connection.execute(sql.partition_owners_sql(tables)).fetchall()
        relays = connection.execute(sql.relays_sql(tables)).fetchall()
    assert pending is not None
    return Status.of(
        outbox=quoted_table(tables.outbox),
        database=describe_url(settings.database_url),
        counts=counts,
        pending=pending,
        owners=owners,
        relays=relays,
        lease=settings.relay_lease,
    )


@app.command()
@with_settings("relay_lease")
def status(
    fail_if_older_than: Annotated[
        str | None,
        typer.Option(
            "--fail-if-older-than",
            envvar="POSTROOM_FAIL_IF_OLDER_THAN",
            metavar="DURATION",
            help=(
                "Exit 1 when the oldest due pending row has waited longer than this "
                "(30s, 5m, 1h): a probe for monitoring or cron."
            ),
            show_default=False,
        ),
    ] = None,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Counts by state and topic, the oldest pending row's wait, partitions and relays.

    A pending row's wait counts from when it became due (written, or its delay ended), so
    delayed messages do not look stuck. A relay is *stale* when its last heartbeat is
    older than --lease; partitions whose owner is gone move to live relays by themselves.
    """
    threshold = duration(fail_if_older_than, "--fail-if-older-than")
    found = _read_status(settings)
    oldest = found.oldest_age
    check_failed = threshold is not None and oldest is not None and oldest > threshold
    if as_json:
        status_json(found, threshold, check_failed)
    else:
        status_text(found)
    if check_failed:
        error_console.print(
            f"check failed: the oldest pending row has waited {age(oldest)}, "
            f"longer than {fail_if_older_than}",
            highlight=False,
        )
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("ls")
@with_settings()
def list_rows(
    state: Annotated[
        list[State] | None,
        states(
            "POSTROOM_OUTBOX_STATE",
            "Only rows in this state (repeat for several). *backing-off*: pending rows "
            "that failed and wait for their next attempt (also counted as pending).",
        ),
    ] = None,
    topic: Topic = None,
    key: Key = None,
    older_than: OutboxOlderThan = None,
    newer_than: OutboxNewerThan = None,
    error: Error = None,
    newest_first: Annotated[
        bool,
        newest(
            "POSTROOM_OUTBOX_NEWEST",
            "Newest rows first, or oldest first (the order the relay publishes in).",
        ),
    ] = False,
    limit: OutboxLimit = 50,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """List outbox rows: state, attempts, age and last error, filtered and ordered.

    Find what is stuck with `--state dead` or `--state backing-off`, narrow with
    --topic, --key, --error and --older-than, then look at one row with `outbox show ID`.
    """
    flt = Filter.given(
        None,
        state,
        topics=topic,
        keys=key,
        older_than=older_than,
        newer_than=newer_than,
        error=error,
    )
    tables = tables_for(settings)
    params = {**flt.params(), "limit": limit}
    with connect(settings) as connection:
        at = now(connection)
        matched = scalar(connection, sql.outbox_count_sql(tables), params)
        rows = query(connection, sql.outbox_rows_sql(tables, newest_first=newest_first), params)
    items = [row_json(r, at) for r in rows]
    listing = rows_table(None, rows, at)
    show_listing(
        listing, items, matched, newest_first, as_json, what=("outbox", "rows"), filters=flt.words()
    )


@app.command()
@with_settings()
def show(
    message_id: Annotated[
        str,
        typer.Argument(
            help="The message id: the postroom-id of logs and brokers (a UUID, any spelling).",
            metavar="ID",
            show_default=False,
        ),
    ],
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Everything about one row: every field, its headers, the payload pretty-printed, and
    its last error.

    Only the number of failed attempts and the last error are kept, not each attempt.
    """
    wanted = parse_uuid(message_id)
    tables = tables_for(settings)
    with connect(settings) as connection:
        at = now(connection)
        rows = query(connection, sql.outbox_row_sql(tables), {"id": wanted})
    if not rows:
        failed(
            f"message {wanted} is not in the outbox {_where(settings)}: it was never written "
            "there, or it was published and then deleted by retention "
            "(POSTROOM_RELAY_RETENTION) or by `outbox purge`"
        )
    row = rows[0]
    if as_json:
        payload = bytes(row["payload"])
        kind, view = payload_view(payload, row["content_type"])
        document = row_json(row, at)
        document["headers"] = row["headers"]
        document["payload_base64"] = payload
        document["payload_format"] = kind
        if kind in {"json", "text"}:
            document["payload"] = view
        print_json(document)
        return
    show_row(row, at)


def _cursor(tables: Tables) -> Callable[[psycopg.Connection[Any]], dict[str, Any]]:
    """Where a change's cursor starts and stops: all rows there are when it is confirmed."""

    def start(connection: psycopg.Connection[Any]) -> dict[str, Any]:
        upto = int(scalar(connection, sql.max_position_sql(tables), {}))
        return {"channel": tables.notify_channel, "after": 0, "upto": upto}

    return start


@dataclass(frozen=True)
class _BackToPending:
    """How ``retry`` or ``replay`` moves rows back to pending: its words, rows and checks."""

    verb: str
    what: str
    every: str
    guard: str
    batch: Callable[[Tables], str]
    note: Callable[[str], str | None]
    missing: str
    done: Callable[[int], list[str]]

    def run(
        self,
        settings: Settings,
        flt: Filter,
        everything: bool,
        mode: Mode,
        facts: Callable[[psycopg.Connection[Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Check the selection and the ids, then change the rows."""
        params = guarded(settings, flt, everything, self.verb, self.every, self.note, self.missing)
        tables = tables_for(settings)
        change_rows(
            settings,
            Wording(self.what, self.verb, flt.words(), f"in {_where(settings)}"),
            mode,
            Statements(
                sql.outbox_count_sql(tables, self.guard),
                sql.outbox_rows_sql(tables, self.guard),
                self.batch(tables),
                sql.UPDATE_BATCH,
                _cursor(tables),
            ),
            params,
            preview=rows_table,
            item_json=row_json,
            done=self.done,
            facts=facts,
        )


REPLAY_NOTE = (
    "Replayed messages keep their ids: consumers with an inbox skip the ones they already "
    "handled; consumers without one handle them again."
)

_RETRY = _BackToPending(
    verb="retry",
    what="dead or backing-off rows",
    every="every dead and backing-off row",
    guard=sql.RETRYABLE,
    batch=sql.retry_batch_sql,
    note=lambda state: (
        None
        if state in {DEAD, PENDING}
        else "is published, not dead: use `postroom outbox replay` to publish it again"
    ),
    missing="is not in the outbox: check the id with `postroom outbox ls`",
    done=lambda changed: [
        f"Retried {changed} rows: they are pending and due now; a running relay publishes "
        "them within moments (`postroom outbox status` shows the backlog).",
        "Dead rows had their attempts reset to 0.",
    ],
)

_REPLAY = _BackToPending(
    verb="replay",
    what="published rows",
    every="every published row still kept",
    guard=sql.REPLAYABLE,
    batch=sql.replay_batch_sql,
    note=lambda state: (
        None
        if state == PUBLISHED
        else f"is {state}, not published: nothing to replay"
        + (" (use `postroom outbox retry`)" if state == DEAD else "")
    ),
    missing="is not in the outbox, so it cannot be replayed: published rows are deleted after "
    "the retention period (POSTROOM_RELAY_RETENTION, 24h by default) or by "
    "`outbox purge`, or it was never written to this outbox",
    done=lambda changed: [
        f"Replaying {changed} messages: they are pending and due now; a running relay "
        "publishes them again within moments.",
        REPLAY_NOTE,
    ],
)


@app.command()
@with_settings()
@with_mode
def retry(
    ids: Ids = None,
    state: Annotated[
        list[RetryState] | None,
        states(
            "POSTROOM_OUTBOX_RETRY_STATE",
            "Only dead rows, or only rows backing off after a failure (default: both).",
        ),
    ] = None,
    topic: Topic = None,
    key: Key = None,
    older_than: OutboxOlderThan = None,
    newer_than: OutboxNewerThan = None,
    error: Error = None,
    everything: OutboxAll = False,
    *,
    mode: Mode,
    settings: Settings,
) -> None:
    """Send dead-lettered and backing-off rows again now: back to pending, due at once.

    Dead rows get their attempts reset to 0, so they have a full set of attempts
    (POSTROOM_RELAY_MAX_ATTEMPTS) again; backing-off rows keep theirs. The last error is
    kept until the next attempt replaces it. Fix the cause first (a missing queue binding,
    a topic, a size limit), or the rows will be dead-lettered again.
    """
    flt = Filter.given(
        ids,
        state,
        topics=topic,
        keys=key,
        older_than=older_than,
        newer_than=newer_than,
        error=error,
    )
    _RETRY.run(settings, flt, everything, mode)


@app.command()
@with_settings()
@with_mode
def replay(
    ids: Ids = None,
    topic: Topic = None,
    key: Key = None,
    older_than: OutboxOlderThan = None,
    newer_than: OutboxNewerThan = None,
    everything: OutboxAll = False,
    *,
    mode: Mode,
    settings: Settings,
) -> None:
    """Publish already-published messages again, with their original ids.

    For a consumer that lost its data: the rows go back to pending, due now, and the
    relay publishes them again. **Same id**: consumers with an inbox skip the messages they
    already handled; consumers without one handle them again. Replayed messages reach the
    broker after newer messages of their key that are already out. Only rows still in the
    outbox can be replayed: published rows are deleted after POSTROOM_RELAY_RETENTION
    (24h by default).
    """
    flt = Filter.given(ids, topics=topic, keys=key, older_than=older_than, newer_than=newer_than)
    tables = tables_for(settings)

    def oldest(connection: psycopg.Connection[Any]) -> dict[str, Any]:
        kept = scalar(connection, sql.oldest_published_sql(tables), {})
        if not mode.as_json and kept is not None and not flt.ids:
            say(
                f"The oldest published row still kept was written {timestamp(kept)}; older "
                "ones were deleted by retention and cannot be replayed."
            )
        return {"oldest_published_kept_created_at": kept, "note": REPLAY_NOTE}

    _REPLAY.run(settings, flt, everything, mode, oldest)


@app.command()
@with_settings()
@with_mode
def purge(
    older_than: Annotated[
        str,
        since(
            "--older-than",
            "POSTROOM_OUTBOX_PURGE_OLDER_THAN",
            "Delete rows published (or dead-lettered) longer ago than this",
        ),
    ],
    state: Annotated[
        list[PurgeState] | None,
        states(
            "POSTROOM_OUTBOX_PURGE_STATE",
            "Which finished rows to delete; repeat for both (default: published only).",
        ),
    ] = None,
    topic: Topic = None,
    *,
    mode: Mode,
    settings: Settings,
) -> None:
    """Delete published and/or dead rows that finished longer ago than --older-than.

    Age counts from when a row was published (or dead-lettered), not written. Rows are
    deleted in batches of 5,000, each its own transaction, so the outbox stays usable.
    Pending rows are never purged. Deleted rows cannot be replayed or retried.
    """
    purged = [s.value for s in state or [PurgeState.published]]
    tables = tables_for(settings)
    words = {"state": purged, "finished more than": f"{older_than} ago", "topic": topic}
    change_rows(
        settings,
        Wording(" or ".join(purged) + " rows", "delete", words, f"in {_where(settings)}"),
        mode,
        Statements(
            sql.purge_count_sql(tables),
            sql.purge_rows_sql(tables),
            sql.purge_batch_sql(tables),
            sql.DELETE_BATCH,
        ),
        {
            "states": purged,
            "topics": topic or None,
            "finished_before": duration(older_than, "--older-than"),
        },
        preview=rows_table,
        item_json=row_json,
        done=lambda changed: [f"Deleted {changed} rows."],
    )
