"""Which outbox rows an operator command selects: its options, states and filter, and
the checks made before a change."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
import typer

from postroom.cli.common import error_console, fail
from postroom.cli.output import EXIT_USAGE, connect, duration, failed, parse_uuid
from postroom.config import Settings
from postroom.schema import operations_sql as sql
from postroom.schema.tables import DEAD, PENDING, PUBLISHED, Tables, tables_for


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

    @classmethod
    def given(cls, ids: list[str] | None, state: list[Any] | None = None, **filters: Any) -> Filter:
        """The filter from a command's arguments (ids checked, states as their names)."""
        return cls(
            ids=[parse_uuid(t) for t in ids] if ids else None,
            states=[s.value for s in state or []],
            **filters,
        )

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


def check_ids(
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


def guarded(
    settings: Settings,
    flt: Filter,
    everything: bool,
    command: str,
    rows: str,
    accepted: Callable[[str], str | None],
    missing: str,
) -> dict[str, Any]:
    """Refuse a change of every row unless --all was given; check the ids given.

    Returns the filter's statement parameters (bad usage exits 2 before any id is looked up).
    """
    if not flt.narrows and not everything:
        fail(
            f"say which rows to {command}: give message ids or a filter "
            f"(--topic, --key, --older-than, --newer-than, --error), or --all for {rows}",
            EXIT_USAGE,
        )
    params = flt.params()
    if flt.ids:
        with connect(settings) as connection:
            check_ids(connection, tables_for(settings), flt.ids, accepted, missing)
    return params
