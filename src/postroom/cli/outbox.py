"""``postroom outbox``: see what is stuck and why, retry it, replay it, purge old rows."""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, cast

import psycopg
import typer
from psycopg.rows import dict_row
from rich.table import Table

from postroom.cli.common import EXIT_CHECK_FAILED, console, error_console, fail, with_settings
from postroom.cli.output import (
    EXIT_USAGE,
    DryRun,
    Json,
    Yes,
    age,
    cell,
    confirm,
    connect,
    describe,
    duration,
    failed,
    nothing_matches,
    parse_uuid,
    payload_view,
    print_json,
    ranges,
    say,
    seconds_between,
    table,
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

#: Rows shown (and put in ``--json``'s ``sample``) before a change.
SAMPLE_ROWS = 20


class State(enum.StrEnum):
    """A row's state as the operator commands name it."""

    pending = PENDING
    backing_off = sql.BACKING_OFF
    published = PUBLISHED
    dead = DEAD


class RetryState(enum.StrEnum):
    """The states ``retry`` moves back to pending."""

    dead = DEAD
    backing_off = sql.BACKING_OFF


class PurgeState(enum.StrEnum):
    """The states ``purge`` deletes."""

    published = PUBLISHED
    dead = DEAD


Ids = Annotated[
    list[str] | None,
    typer.Argument(
        help="Message ids (UUIDs, as `outbox ls` shows them).",
        metavar="ID",
        show_default=False,
    ),
]
Topic = Annotated[
    list[str] | None,
    typer.Option(
        "--topic",
        "-t",
        envvar="POSTROOM_OUTBOX_TOPIC",
        metavar="TOPIC",
        help="Only rows of this topic (repeat for several).",
        show_default=False,
    ),
]
Key = Annotated[
    list[str] | None,
    typer.Option(
        "--key",
        "-k",
        envvar="POSTROOM_OUTBOX_KEY",
        metavar="KEY",
        help="Only rows with this key (repeat for several).",
        show_default=False,
    ),
]
OlderThan = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        envvar="POSTROOM_OUTBOX_OLDER_THAN",
        metavar="DURATION",
        help="Only rows written longer ago than this: 30s, 5m, 24h, 7d.",
        show_default=False,
    ),
]
NewerThan = Annotated[
    str | None,
    typer.Option(
        "--newer-than",
        envvar="POSTROOM_OUTBOX_NEWER_THAN",
        metavar="DURATION",
        help="Only rows written within this long: 30s, 5m, 24h, 7d.",
        show_default=False,
    ),
]
Error = Annotated[
    str | None,
    typer.Option(
        "--error",
        "-e",
        envvar="POSTROOM_OUTBOX_ERROR",
        metavar="TEXT",
        help="Only rows whose last error contains this text (case does not matter).",
        show_default=False,
    ),
]
All = Annotated[
    bool,
    typer.Option(
        "--all",
        envvar="POSTROOM_OUTBOX_ALL",
        help="Without ids or filters: act on every row this command applies to.",
    ),
]


@dataclass(frozen=True)
class Filter:
    """Which outbox rows an operator asked for."""

    ids: list[uuid.UUID] | None = None
    states: list[str] | None = None
    topics: list[str] | None = None
    keys: list[str] | None = None
    older_than: str | None = None
    newer_than: str | None = None
    error: str | None = None

    def params(self) -> dict[str, Any]:
        """The statement parameters of this filter (durations in seconds)."""
        return {
            "ids": self.ids or None,
            "states": self.states or None,
            "topics": self.topics or None,
            "keys": self.keys or None,
            "older_than": duration(self.older_than, "--older-than"),
            "newer_than": duration(self.newer_than, "--newer-than"),
            "error": self.error,
        }

    @property
    def narrows(self) -> bool:
        """True when anything but the state was given."""
        return any((self.ids, self.topics, self.keys, self.older_than, self.newer_than, self.error))

    def words(self) -> dict[str, Any]:
        """The filter, for sentences."""
        return {
            "id": [str(i) for i in self.ids or []],
            "state": self.states,
            "topic": self.topics,
            "key": self.keys,
            "older than": self.older_than,
            "newer than": self.newer_than,
            "error containing": repr(self.error) if self.error else None,
        }


def _ids(texts: list[str] | None) -> list[uuid.UUID] | None:
    return [parse_uuid(t) for t in texts] if texts else None


def _where(settings: Settings) -> str:
    return f"{quoted_table(tables_for(settings).outbox)} at {describe_url(settings.database_url)}"


def _now(connection: psycopg.Connection[Any]) -> datetime:
    row = connection.execute("SELECT now()").fetchone()
    assert row is not None
    return cast(datetime, row[0])


def _query(
    connection: psycopg.Connection[Any], statement: str, params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    with connection.cursor(row_factory=dict_row) as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall()


def _scalar(connection: psycopg.Connection[Any], statement: str, params: Mapping[str, Any]) -> Any:
    row = connection.execute(statement, params).fetchone()
    return None if row is None else row[0]


def _state(row: Mapping[str, Any], now: datetime) -> str:
    if (
        row["status"] == PENDING
        and row["attempts"] > 0
        and row["next_attempt_at"] is not None
        and row["next_attempt_at"] > now
    ):
        return sql.BACKING_OFF
    return str(row["status"])


def _row_json(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    document = {k: v for k, v in row.items() if k not in {"payload", "headers", "payload_bytes"}}
    document["id"] = str(row["id"])
    document["state"] = _state(row, now)
    document["age_seconds"] = seconds_between(now, row["created_at"])
    document["payload_bytes"] = row["payload_bytes"]
    return document


def _when(row: Mapping[str, Any], now: datetime) -> str:
    state = _state(row, now)
    if state == PUBLISHED:
        return f"published {age(seconds_between(now, row['published_at']))} ago"
    if state == DEAD:
        return f"dead {age(seconds_between(now, row['dead_lettered_at']))} ago"
    if state == sql.BACKING_OFF:
        return f"next try in {age(-(seconds_between(now, row['next_attempt_at']) or 0))}"
    if row["available_at"] > now:
        return f"delayed {age(-(seconds_between(now, row['available_at']) or 0))}"
    return f"due {age(seconds_between(now, row['available_at']))} ago"


def _short(text: str | None, width: int = 70) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def _rows_table(title: str | None, rows: list[dict[str, Any]], now: datetime) -> Table:
    return table(
        title,
        ["id", "topic", "key", "state", "attempts", "age", "when", "last error"],
        [
            (
                r["id"],
                r["topic"],
                r["key"],
                _state(r, now),
                r["attempts"],
                age(seconds_between(now, r["created_at"])),
                _when(r, now),
                _short(r["last_error"]),
            )
            for r in rows
        ],
        keep_whole=2,
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
    tables = tables_for(settings)
    with connect(settings) as connection:
        counts = connection.execute(sql.state_counts_sql(tables)).fetchall()
        pending_row = connection.execute(sql.pending_summary_sql(tables)).fetchone()
        owners = connection.execute(sql.partition_owners_sql(tables)).fetchall()
        relays = connection.execute(sql.relays_sql(tables)).fetchall()
    assert pending_row is not None
    pending, delayed, oldest_due, oldest_age, _ = pending_row
    oldest_age = None if oldest_age is None else float(oldest_age)
    by_topic: dict[str, dict[str, int]] = {}
    totals = {PENDING: 0, sql.BACKING_OFF: 0, PUBLISHED: 0, DEAD: 0}
    for state, topic, count in counts:
        by_topic.setdefault(topic, dict.fromkeys(totals, 0))[state] = count
        totals[state] += count
    for topic_counts in by_topic.values():
        topic_counts[PENDING] += topic_counts[sql.BACKING_OFF]
    live = {r[0] for r in relays if float(r[5]) <= settings.relay_lease}
    orphaned = sum(o[4] for o in owners if o[0] is None or o[0] not in live)
    check_failed = threshold is not None and oldest_age is not None and oldest_age > threshold
    if as_json:
        print_json(
            {
                "outbox": quoted_table(tables.outbox),
                "database": describe_url(settings.database_url),
                "counts": {
                    "pending": pending,
                    "backing_off": totals[sql.BACKING_OFF],
                    "delayed": delayed,
                    "published": totals[PUBLISHED],
                    "dead": totals[DEAD],
                },
                "oldest_pending": None
                if oldest_due is None
                else {"due_at": oldest_due, "age_seconds": oldest_age},
                "topics": [
                    {
                        "topic": topic,
                        "pending": c[PENDING],
                        "backing_off": c[sql.BACKING_OFF],
                        "published": c[PUBLISHED],
                        "dead": c[DEAD],
                    }
                    for topic, c in sorted(by_topic.items())
                ],
                "partitions": [
                    {
                        "owner": owner,
                        "partitions": list(numbers),
                        "expired_leases": expired,
                        "lease_expires_at": expires,
                        "pending": waiting,
                    }
                    for owner, numbers, expired, expires, waiting in owners
                ],
                "pending_without_live_relay": orphaned,
                "relays": [
                    {
                        "relay_id": relay_id,
                        "host": host,
                        "pid": pid,
                        "started_at": started,
                        "heartbeat_at": heartbeat,
                        "heartbeat_age_seconds": float(heartbeat_age),
                        "live": relay_id in live,
                    }
                    for relay_id, host, pid, started, heartbeat, heartbeat_age in relays
                ],
                "fail_if_older_than_seconds": threshold,
                "check_failed": check_failed,
            }
        )
    else:
        say(f"Outbox {_where(settings)}")
        waiting = (
            f"; the oldest due row has waited {age(oldest_age)} (due {timestamp(oldest_due)})"
            if oldest_due is not None
            else ""
        )
        say(
            f"  pending    {pending} ({totals[sql.BACKING_OFF]} backing off after a failure, "
            f"{delayed} delayed){waiting}"
        )
        dead_hint = "  — see `postroom outbox ls --state dead`" if totals[DEAD] else ""
        say(f"  dead       {totals[DEAD]}{dead_hint}")
        say(f"  published  {totals[PUBLISHED]} (kept for replay until retention purges them)")
        if by_topic:
            console.print(
                table(
                    "By topic",
                    ["topic", "pending", "backing off", "dead", "published"],
                    [
                        (t, c[PENDING], c[sql.BACKING_OFF], c[DEAD], c[PUBLISHED])
                        for t, c in sorted(by_topic.items())
                    ],
                )
            )
        console.print(
            table(
                "Partitions by owner (from the leases)",
                ["owner", "partitions", "count", "pending rows", "lease"],
                [
                    (
                        owner or "(nobody)",
                        ranges(list(numbers)),
                        len(numbers),
                        waiting_rows,
                        "-"
                        if owner is None
                        else (f"{expired} expired" if expired else f"until {timestamp(expires)}"),
                    )
                    for owner, numbers, expired, expires, waiting_rows in owners
                ],
            )
        )
        if relays:
            console.print(
                table(
                    "Relays",
                    ["relay", "host", "pid", "started", "last heartbeat", "state"],
                    [
                        (
                            relay_id,
                            host,
                            pid,
                            started,
                            f"{age(float(heartbeat_age))} ago",
                            "live" if relay_id in live else "stale",
                        )
                        for relay_id, host, pid, started, _, heartbeat_age in relays
                    ],
                )
            )
        else:
            say("No relay is registered: nothing is publishing this outbox.")
        if orphaned:
            say(
                f"{orphaned} pending rows are in partitions no live relay holds: "
                "start a relay (`postroom relay`), or wait for the leases to move."
            )
    if check_failed:
        error_console.print(
            f"check failed: the oldest pending row has waited {age(oldest_age)}, "
            f"longer than {fail_if_older_than}",
            highlight=False,
        )
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("ls")
@with_settings()
def list_rows(
    state: Annotated[
        list[State] | None,
        typer.Option(
            "--state",
            "-s",
            envvar="POSTROOM_OUTBOX_STATE",
            help=(
                "Only rows in this state (repeat for several). *backing-off*: pending rows "
                "that failed and wait for their next attempt (also counted as pending)."
            ),
            show_default=False,
        ),
    ] = None,
    topic: Topic = None,
    key: Key = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    error: Error = None,
    newest: Annotated[
        bool,
        typer.Option(
            "--newest/--oldest",
            envvar="POSTROOM_OUTBOX_NEWEST",
            help="Newest rows first, or oldest first (the order the relay publishes in).",
        ),
    ] = False,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", "-n", envvar="POSTROOM_OUTBOX_LIMIT", min=1, help="Show at most this many."
        ),
    ] = 50,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """List outbox rows: state, attempts, age and last error, filtered and ordered.

    Find what is stuck with `--state dead` or `--state backing-off`, narrow with
    --topic, --key, --error and --older-than, then look at one row with `outbox show ID`.
    """
    flt = Filter(
        states=[s.value for s in state or []],
        topics=topic,
        keys=key,
        older_than=older_than,
        newer_than=newer_than,
        error=error,
    )
    tables = tables_for(settings)
    params = {**flt.params(), "limit": limit}
    with connect(settings) as connection:
        now = _now(connection)
        matched = _scalar(connection, sql.outbox_count_sql(tables), params)
        rows = _query(connection, sql.outbox_rows_sql(tables, newest_first=newest), params)
    order = "newest first" if newest else "oldest first"
    if as_json:
        print_json(
            {
                "matched": matched,
                "shown": len(rows),
                "order": order,
                "rows": [_row_json(r, now) for r in rows],
            }
        )
        return
    if not rows:
        say(f"No outbox rows match ({describe(flt.words())}).")
        return
    console.print(_rows_table(None, rows, now))
    more = "; raise --limit to see more" if matched > len(rows) else ""
    say(f"{len(rows)} of {matched} matching rows, {order}{more}.")


@app.command()
@with_settings()
def show(
    message_id: Annotated[
        str, typer.Argument(help="The message id (a UUID).", metavar="ID", show_default=False)
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
        now = _now(connection)
        rows = _query(connection, sql.outbox_row_sql(tables), {"id": wanted})
    if not rows:
        failed(
            f"message {wanted} is not in the outbox {_where(settings)}: it was never written "
            "there, or it was published and then deleted by retention "
            "(POSTROOM_RELAY_RETENTION) or by `outbox purge`"
        )
    row = rows[0]
    payload = bytes(row["payload"])
    kind, view = payload_view(payload, row["content_type"])
    state = _state(row, now)
    if as_json:
        document = _row_json(row, now)
        document["headers"] = row["headers"]
        document["payload_base64"] = payload
        document["payload_format"] = kind
        if kind in {"json", "text"}:
            document["payload"] = view
        print_json(document)
        return
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column(overflow="fold")
    for label, value in (
        ("id", row["id"]),
        ("state", state),
        ("topic", row["topic"]),
        ("key", row["key"]),
        ("partition", row["partition"]),
        ("position", row["position"]),
        ("content type", row["content_type"]),
        ("payload size", f"{row['payload_bytes']} bytes"),
        (
            "created",
            f"{timestamp(row['created_at'])} ({age(seconds_between(now, row['created_at']))} ago)",
        ),
        ("available", timestamp(row["available_at"])),
        ("attempts", f"{row['attempts']} failed publishes (only the last error is kept)"),
        ("next attempt", timestamp(row["next_attempt_at"]) if row["status"] == PENDING else None),
        ("published", row["published_at"]),
        ("dead-lettered", row["dead_lettered_at"]),
    ):
        fields.add_row(label, cell(value))
    console.print(fields)
    headers = row["headers"] or {}
    if headers:
        console.print(table("Headers", ["name", "value"], sorted(headers.items())))
    else:
        say("Headers: none")
    say(f"\nPayload ({kind}):")
    if kind == "json":
        say(json.dumps(view, indent=2, ensure_ascii=False))
    elif kind == "text":
        say(str(view))
    else:
        shown = "first 512 bytes" if len(payload) > 512 else f"{len(payload)} bytes"
        say(f"{view}\n({shown}, hex)")
    if row["last_error"]:
        say(f"\nLast error:\n{row['last_error']}")
    if state in {DEAD, sql.BACKING_OFF}:
        say(f"\nSend it again now: postroom outbox retry {row['id']}")
    elif state == PUBLISHED:
        say(f"\nPublish it again: postroom outbox replay {row['id']}")


def _check_ids(
    connection: psycopg.Connection[Any],
    tables: Tables,
    ids: list[uuid.UUID],
    accepted: Callable[[str], str | None],
    missing: str,
) -> None:
    """Exit 3 naming ids not in the outbox; warn about ids in a state the command skips."""
    found = dict(connection.execute(sql.outbox_states_of_sql(tables), {"ids": ids}).fetchall())
    absent = [str(i) for i in ids if i not in found]
    if absent:
        failed(f"{'message' if len(absent) == 1 else 'messages'} {', '.join(absent)} {missing}")
    for message_id, status_ in found.items():
        note = accepted(status_)
        if note:
            error_console.print(f"note: {message_id} {note}", highlight=False)


def _change(
    *,
    settings: Settings,
    what: str,
    verb: str,
    count_sql: str,
    sample_sql: str,
    batch_sql: str,
    params: dict[str, Any],
    words: dict[str, Any],
    dry_run: bool,
    yes: bool,
    as_json: bool,
    done: Callable[[int], list[str]],
    extra: Callable[[psycopg.Connection[Any]], dict[str, Any]] | None = None,
    batch: int = sql.UPDATE_BATCH,
) -> None:
    """Count, show, confirm, then apply ``batch_sql`` in batches until it changes nothing."""
    tables = tables_for(settings)
    with connect(settings) as connection:
        now = _now(connection)
        facts = extra(connection) if extra else {}
        matched = int(_scalar(connection, count_sql, params))
        if matched == 0:
            nothing_matches(what, words, as_json=as_json, dry_run=dry_run, changed=0, **facts)
        sample = _query(connection, sample_sql, {**params, "limit": SAMPLE_ROWS})
        if not as_json:
            shown = f"first {len(sample)} of {matched}" if matched > len(sample) else str(matched)
            console.print(_rows_table(f"{what.capitalize()} to {verb} ({shown})", sample, now))
        if dry_run:
            if as_json:
                print_json(
                    {
                        "dry_run": True,
                        "matched": matched,
                        "changed": 0,
                        "sample": [_row_json(r, now) for r in sample],
                        **facts,
                    }
                )
            else:
                say(f"Dry run: would {verb} {matched} {what}; nothing changed.")
            return
        confirm(f"{verb.capitalize()} {matched} {what} in {_where(settings)}?", yes=yes)
        changed = 0
        statement = batch_sql
        batch_params = {
            **params,
            "limit": batch,
            "channel": tables.notify_channel,
            "after": 0,
            "upto": int(_scalar(connection, sql.max_position_sql(tables), {})),
        }
        while True:
            with connection.transaction():
                cursor = connection.execute(statement, batch_params)
                row = cursor.fetchone() if cursor.description else None
                count = int(row[0]) if row else cursor.rowcount
            changed += count
            if count == 0:
                break
            if row is not None and len(row) > 1:
                batch_params["after"] = int(row[1])
    if as_json:
        print_json(
            {
                "dry_run": False,
                "matched": matched,
                "changed": changed,
                "sample": [_row_json(r, now) for r in sample],
                **facts,
            }
        )
    else:
        for line in done(changed):
            say(line)


def _require_selection(flt: Filter, everything: bool, command: str, rows: str) -> None:
    if not flt.narrows and not everything:
        fail(
            f"say which rows to {command}: give message ids or a filter "
            f"(--topic, --key, --older-than, --newer-than, --error), or --all for {rows}",
            EXIT_USAGE,
        )


@app.command()
@with_settings()
def retry(
    ids: Ids = None,
    state: Annotated[
        list[RetryState] | None,
        typer.Option(
            "--state",
            "-s",
            envvar="POSTROOM_OUTBOX_RETRY_STATE",
            help="Only dead rows, or only rows backing off after a failure (default: both).",
            show_default=False,
        ),
    ] = None,
    topic: Topic = None,
    key: Key = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    error: Error = None,
    everything: All = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Send dead-lettered and backing-off rows again now: back to pending, due at once.

    Dead rows get their attempts reset to 0, so they have a full set of attempts
    (POSTROOM_RELAY_MAX_ATTEMPTS) again; backing-off rows keep theirs. The last error is
    kept until the next attempt replaces it. Fix the cause first (a missing queue binding,
    a topic, a size limit), or the rows will be dead-lettered again.
    """
    flt = Filter(
        ids=_ids(ids),
        states=[s.value for s in state or []],
        topics=topic,
        keys=key,
        older_than=older_than,
        newer_than=newer_than,
        error=error,
    )
    _require_selection(flt, everything, "retry", "every dead and backing-off row")
    tables = tables_for(settings)
    params = flt.params()
    if flt.ids:
        with connect(settings) as connection:
            _check_ids(
                connection,
                tables,
                flt.ids,
                lambda s: (
                    None
                    if s in {DEAD, PENDING}
                    else "is published, not dead: use `postroom outbox replay` to publish it again"
                ),
                "is not in the outbox: check the id with `postroom outbox ls`",
            )

    def done(changed: int) -> list[str]:
        return [
            f"Retried {changed} rows: they are pending and due now; a running relay publishes "
            "them within moments (`postroom outbox status` shows the backlog).",
            "Dead rows had their attempts reset to 0.",
        ]

    _change(
        settings=settings,
        what="dead or backing-off rows",
        verb="retry",
        count_sql=sql.outbox_count_sql(tables, sql.RETRYABLE),
        sample_sql=sql.outbox_rows_sql(tables, sql.RETRYABLE),
        batch_sql=sql.retry_batch_sql(tables),
        params=params,
        words=flt.words(),
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        done=done,
    )


REPLAY_NOTE = (
    "Replayed messages keep their ids: consumers with an inbox skip the ones they already "
    "handled; consumers without one handle them again."
)


@app.command()
@with_settings()
def replay(
    ids: Ids = None,
    topic: Topic = None,
    key: Key = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    everything: All = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    as_json: Json = False,
    *,
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
    flt = Filter(
        ids=_ids(ids), topics=topic, keys=key, older_than=older_than, newer_than=newer_than
    )
    _require_selection(flt, everything, "replay", "every published row still kept")
    tables = tables_for(settings)
    if flt.ids:
        with connect(settings) as connection:
            _check_ids(
                connection,
                tables,
                flt.ids,
                lambda s: (
                    None
                    if s == PUBLISHED
                    else f"is {s}, not published: nothing to replay"
                    + (" (use `postroom outbox retry`)" if s == DEAD else "")
                ),
                "is not in the outbox, so it cannot be replayed: published rows are deleted after "
                "the retention period (POSTROOM_RELAY_RETENTION, 24h by default) or by "
                "`outbox purge`, or it was never written to this outbox",
            )

    def oldest(connection: psycopg.Connection[Any]) -> dict[str, Any]:
        kept = _scalar(connection, sql.oldest_published_sql(tables), {})
        if not as_json and kept is not None and not flt.ids:
            say(
                f"The oldest published row still kept was written {timestamp(kept)}; older "
                "ones were deleted by retention and cannot be replayed."
            )
        return {"oldest_published_kept_created_at": kept, "note": REPLAY_NOTE}

    def done(changed: int) -> list[str]:
        return [
            f"Replaying {changed} messages: they are pending and due now; a running relay "
            "publishes them again within moments.",
            REPLAY_NOTE,
        ]

    _change(
        settings=settings,
        what="published rows",
        verb="replay",
        count_sql=sql.outbox_count_sql(tables, sql.REPLAYABLE),
        sample_sql=sql.outbox_rows_sql(tables, sql.REPLAYABLE),
        batch_sql=sql.replay_batch_sql(tables),
        params=flt.params(),
        words=flt.words(),
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        done=done,
        extra=oldest,
    )


@app.command()
@with_settings()
def purge(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            envvar="POSTROOM_OUTBOX_PURGE_OLDER_THAN",
            metavar="DURATION",
            help=(
                "Delete rows published (or dead-lettered) longer ago than this: 30s, 5m, 24h, 7d."
            ),
            show_default=False,
        ),
    ],
    state: Annotated[
        list[PurgeState] | None,
        typer.Option(
            "--state",
            "-s",
            envvar="POSTROOM_OUTBOX_PURGE_STATE",
            help="Which finished rows to delete; repeat for both (default: published only).",
            show_default=False,
        ),
    ] = None,
    topic: Topic = None,
    dry_run: DryRun = False,
    yes: Yes = False,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Delete published and/or dead rows that finished longer ago than --older-than.

    Age counts from when a row was published (or dead-lettered), not written. Rows are
    deleted in batches of 5,000, each its own transaction, so the outbox stays usable.
    Pending rows are never purged. Deleted rows cannot be replayed or retried.
    """
    states = [s.value for s in state or [PurgeState.published]]
    tables = tables_for(settings)
    params = {
        "states": states,
        "topics": topic or None,
        "finished_before": duration(older_than, "--older-than"),
    }
    _change(
        settings=settings,
        what=" or ".join(states) + " rows",
        verb="delete",
        count_sql=sql.purge_count_sql(tables),
        sample_sql=sql.purge_rows_sql(tables),
        batch_sql=sql.purge_batch_sql(tables),
        params=params,
        words={"state": states, "finished more than": f"{older_than} ago", "topic": topic},
        dry_run=dry_run,
        yes=yes,
        as_json=as_json,
        done=lambda changed: [f"Deleted {changed} rows."],
        batch=sql.DELETE_BATCH,
    )
