"""How ``postroom outbox`` shows rows and the outbox's status: tables, sentences, ``--json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from postroom.cli.common import console
from postroom.cli.output import (
    NEWLINE,
    FittedTable,
    age,
    print_json,
    printable,
    ranges,
    say,
    seconds_between,
    show_fields,
    show_headers_and_payload,
    table,
    timestamp,
)
from postroom.schema.operations_sql import BACKING_OFF
from postroom.schema.tables import DEAD, PENDING, PUBLISHED


def row_state(row: Mapping[str, Any], now: datetime) -> str:
    """The row's state as the commands name it (``backing-off`` for a pending row that
    failed and waits for its next attempt)."""
    if (
        row["status"] == PENDING
        and row["attempts"] > 0
        and row["next_attempt_at"] is not None
        and row["next_attempt_at"] > now
    ):
        return BACKING_OFF
    return str(row["status"])


def row_json(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A row for ``--json``: its columns but the payload and headers, plus state and age."""
    document = {k: v for k, v in row.items() if k not in {"payload", "headers", "payload_bytes"}}
    document["id"] = str(row["id"])
    document["state"] = row_state(row, now)
    document["age_seconds"] = seconds_between(now, row["created_at"])
    document["payload_bytes"] = row["payload_bytes"]
    return document


def _when(row: Mapping[str, Any], now: datetime) -> str:
    state = row_state(row, now)
    if state == PUBLISHED:
        return f"published {age(seconds_between(now, row['published_at']))} ago"
    if state == DEAD:
        return f"dead {age(seconds_between(now, row['dead_lettered_at']))} ago"
    if state == BACKING_OFF:
        return f"next try in {age(-(seconds_between(now, row['next_attempt_at']) or 0))}"
    if row["available_at"] > now:
        return f"delayed {age(-(seconds_between(now, row['available_at']) or 0))}"
    return f"due {age(seconds_between(now, row['available_at']))} ago"


def rows_table(title: str | None, rows: Sequence[Mapping[str, Any]], now: datetime) -> FittedTable:
    """Rows as a table: id, topic, key, state, attempts, age, when, last error."""
    return table(
        title,
        ["id", "topic", "key", "state", "attempts", "age", "when", "last error"],
        [
            (
                r["id"],
                r["topic"],
                r["key"],
                row_state(r, now),
                r["attempts"],
                age(seconds_between(now, r["created_at"])),
                _when(r, now),
                r["last_error"],
            )
            for r in rows
        ],
        free={"topic", "key", "last error"},
        optional=["age", "when"],
    )


@dataclass(frozen=True)
class Status:
    """What ``outbox status`` reports, as read from the database."""

    outbox: str
    database: str
    pending: int
    delayed: int
    oldest_due: datetime | None
    oldest_age: float | None
    totals: dict[str, int]
    by_topic: dict[str, dict[str, int]]
    owners: list[tuple[Any, ...]]
    relays: list[tuple[Any, ...]]
    live: set[str]
    orphaned: int

    @classmethod
    def of(
        cls,
        *,
        outbox: str,
        database: str,
        counts: list[tuple[Any, ...]],
        pending: tuple[Any, ...],
        owners: list[tuple[Any, ...]],
        relays: list[tuple[Any, ...]],
        lease: float,
    ) -> Status:
        """The status from the rows of the status statements (see ``operations_sql``)."""
        waiting, delayed, oldest_due, oldest_age, _ = pending
        by_topic: dict[str, dict[str, int]] = {}
        totals = {PENDING: 0, BACKING_OFF: 0, PUBLISHED: 0, DEAD: 0}
        for state, topic, count in counts:
            by_topic.setdefault(topic, dict.fromkeys(totals, 0))[state] = count
            totals[state] += count
        for topic_counts in by_topic.values():
            topic_counts[PENDING] += topic_counts[BACKING_OFF]
        live = {r[0] for r in relays if float(r[5]) <= lease}
        return cls(
            outbox=outbox,
            database=database,
            pending=waiting,
            delayed=delayed,
            oldest_due=oldest_due,
            oldest_age=None if oldest_age is None else float(oldest_age),
            totals=totals,
            by_topic=by_topic,
            owners=owners,
            relays=relays,
            live=live,
            orphaned=sum(o[4] for o in owners if o[0] is None or o[0] not in live),
        )


def status_json(status: Status, threshold: float | None, check_failed: bool) -> None:
    """Print the status as one JSON document."""
    print_json(
        {
            "outbox": status.outbox,
            "database": status.database,
            "counts": {
                "pending": status.pending,
                "backing_off": status.totals[BACKING_OFF],
                "delayed": status.delayed,
                "published": status.totals[PUBLISHED],
                "dead": status.totals[DEAD],
            },
            "oldest_pending": None
            if status.oldest_due is None
            else {"due_at": status.oldest_due, "age_seconds": status.oldest_age},
            "topics": [
                {
                    "topic": topic,
                    "pending": c[PENDING],
                    "backing_off": c[BACKING_OFF],
                    "published": c[PUBLISHED],
                    "dead": c[DEAD],
                }
                for topic, c in sorted(status.by_topic.items())
            ],
            "partitions": [
                {
                    "owner": owner,
                    "partitions": list(numbers),
                    "expired_leases": expired,
                    "lease_expires_at": expires,
                    "pending": waiting,
                }
                for owner, numbers, expired, expires, waiting in status.owners
            ],
            "pending_without_live_relay": status.orphaned,
            "relays": [
                {
                    "relay_id": relay_id,
                    "host": host,
                    "pid": pid,
                    "started_at": started,
                    "heartbeat_at": heartbeat,
                    "heartbeat_age_seconds": float(heartbeat_age),
                    "live": relay_id in status.live,
                    "broker_state": broker_state,
                    "broker_error": broker_error,
                    "broker_state_age_seconds": float(broker_age),
                }
                for (
                    relay_id,
                    host,
                    pid,
                    started,
                    heartbeat,
                    heartbeat_age,
                    broker_state,
                    broker_error,
                    broker_age,
                ) in status.relays
            ],
            "fail_if_older_than_seconds": threshold,
            "check_failed": check_failed,
        }
    )


def status_text(status: Status) -> None:
    """Print the status as sentences and tables."""
    totals = status.totals
    say(f"Outbox {status.outbox} at {status.database}")
    waiting = (
        f"; the oldest due row has waited {age(status.oldest_age)} "
        f"(due {timestamp(status.oldest_due)})"
        if status.oldest_due is not None
        else ""
    )
    say(
        f"  pending    {status.pending} ({totals[BACKING_OFF]} backing off after a failure, "
        f"{status.delayed} delayed){waiting}"
    )
    dead_hint = "  — see `postroom outbox ls --state dead`" if totals[DEAD] else ""
    say(f"  dead       {totals[DEAD]}{dead_hint}")
    say(f"  published  {totals[PUBLISHED]} (kept for replay until retention purges them)")
    if status.by_topic:
        console.print(
            table(
                "By topic",
                ["topic", "pending", "backing off", "dead", "published"],
                [
                    (t, c[PENDING], c[BACKING_OFF], c[DEAD], c[PUBLISHED])
                    for t, c in sorted(status.by_topic.items())
                ],
                free={"topic"},
            )
        )
    console.print(_owners_table(status.owners))
    if status.relays:
        console.print(_relays_table(status))
    else:
        say("No relay is registered: nothing is publishing this outbox.")
    if status.orphaned:
        say(
            f"{status.orphaned} pending rows are in partitions no live relay holds: "
            "start a relay (`postroom relay`), or wait for the leases to move."
        )


def _owners_table(owners: list[tuple[Any, ...]]) -> FittedTable:
    return table(
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
        free={"partitions"},
    )


def _relays_table(status: Status) -> FittedTable:
    return table(
        "Relays",
        ["relay", "host", "pid", "started", "last heartbeat", "state", "broker"],
        [
            (
                relay_id,
                host,
                pid,
                started,
                f"{age(float(heartbeat_age))} ago",
                "live" if relay_id in status.live else "stale",
                f"{broker_state} for {age(float(broker_age))}"
                + (f": {broker_error}" if broker_error else ""),
            )
            for (
                relay_id,
                host,
                pid,
                started,
                _,
                heartbeat_age,
                broker_state,
                broker_error,
                broker_age,
            ) in status.relays
        ],
        free={"host", "broker"},
    )


def show_row(row: Mapping[str, Any], at: datetime) -> None:
    """Print one row: every field, its headers and payload, its last error, what to do next."""
    state = row_state(row, at)
    payload = bytes(row["payload"])
    show_fields(
        [
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
                f"{timestamp(row['created_at'])} "
                f"({age(seconds_between(at, row['created_at']))} ago)",
            ),
            ("available", timestamp(row["available_at"])),
            ("attempts", f"{row['attempts']} failed publishes (only the last error is kept)"),
            (
                "next attempt",
                timestamp(row["next_attempt_at"]) if row["status"] == PENDING else None,
            ),
            ("published", row["published_at"]),
            ("dead-lettered", row["dead_lettered_at"]),
        ]
    )
    show_headers_and_payload(row["headers"] or {}, payload, row["content_type"])
    if row["last_error"]:
        say(f"\nLast error:\n{printable(row['last_error'], keep=NEWLINE)}")
    if state in {DEAD, BACKING_OFF}:
        say(f"\nSend it again now: postroom outbox retry {row['id']}")
    elif state == PUBLISHED:
        say(f"\nPublish it again: postroom outbox replay {row['id']}")
