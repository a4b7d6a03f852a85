"""The one routine behind every command that changes something: select → preview →
confirm → apply (in bounded batches).

A command takes ``--dry-run``, ``--yes`` and ``--json`` through :func:`with_mode` (one
:class:`Mode`), describes its change with a :class:`Wording`, then hands
:func:`run_change` four functions of its own:

``select() -> Selection``
    Counts what matches and returns a sample to show (at most :data:`SAMPLE_ROWS`), plus
    any facts to add to the ``--json`` document. It changes nothing.
``preview(title, sample) -> renderable``
    The table shown before the question.
``item_json(item) -> dict``
    One sample item in ``--json``.
``apply() -> Done``
    Makes the change once the operator agreed, and says what happened.

For rows in PostgreSQL, :func:`change_rows` does all of it from :class:`Statements` (a
count, a sample, and a statement that changes at most ``%(limit)s`` rows, repeated by
:func:`in_batches`). Any other store plugs into :func:`run_change` directly. For example
``dead-letter requeue`` (decorated with ``@with_mode``, so it gets ``mode``) would call::

    run_change(
        Wording("dead letters", "requeue", {"consumer": consumer},
                place=f"from {broker.where} to {broker.target}",
                target=f" to {broker.target}",
                nothing=_nothing_there(broker, consumer, listing)),
        mode,
        select=select_letters,
        preview=_letters_table,
        item_json=DeadLetter.summary,
        apply=requeue_them,
    )

after browsing the broker for ``listing`` and ``matched`` (exiting 3 naming ids that are
not there), with ``select_letters`` returning ``Selection(len(matched),
matched[:SAMPLE_ROWS])`` and ``requeue_them`` calling ``broker.requeue(matched)`` and
turning its report into ``Done(changed=len(report.requeued), lines=[...],
facts={"requeued": ..., "failed": ...}, errors=["not requeued: ..."],
exit_code=EXIT_FAILED if report.failures else 0)``.

What every command gets from this routine:

* nothing matches: one sentence (or ``{"matched": 0, "items": [], ...}``), exit 0;
* a preview of what would change (the first :data:`SAMPLE_ROWS`, and how many in all);
* ``--dry-run``: the preview and "nothing changed" (``"dry_run": true``), nothing else;
* a question before any change (``--yes`` skips it; without a terminal, ``--yes`` is
  required: exit 2);
* a progress bar on stderr while the change runs (only when stderr is a terminal);
* ``--json``: one document ``{action, dry_run, matched, changed, count, items, ...facts}``
  (:func:`~postroom.cli.output.change_json`; ``items`` holds the sample).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import psycopg
import typer
from rich.console import RenderableType

from postroom.cli.common import console, replace_parameter
from postroom.cli.options import DryRun, Json, Yes
from postroom.cli.output import (
    change_json,
    confirm,
    connect,
    describe,
    now,
    print_json,
    query,
    say,
    scalar,
    warn,
)
from postroom.cli.progress import Advance, progress
from postroom.config import Settings

#: Items shown (and put in ``--json``'s ``items``) before a change.
SAMPLE_ROWS = 20

Item = TypeVar("Item")
R = TypeVar("R")

_MODE_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=option)
    for name, option in (("dry_run", DryRun), ("yes", Yes), ("as_json", Json))
]


@dataclass(frozen=True)
class Wording:
    """How a change is named in its sentences.

    ``what`` is the plural noun (``"inbox entries"``), ``verb`` the action (``"forget"``),
    ``filters`` the selection as words (for "No … match (…)"), ``place`` ends the
    question (``"in <table> at <database>"``), ``target`` ends the dry-run sentence, and
    ``nothing`` replaces the sentence said when nothing matches.
    """

    what: str
    verb: str
    filters: Mapping[str, Any]
    place: str
    target: str = ""
    nothing: str | None = None


@dataclass(frozen=True)
class Mode:
    """How the operator asked to run a change: ``--dry-run``, ``--yes``, ``--json``."""

    dry_run: bool
    yes: bool
    as_json: bool


@dataclass(frozen=True)
class Selection(Generic[Item]):
    """What a change would touch: how many, the first few, and facts for ``--json``."""

    matched: int
    sample: Sequence[Item]
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    """What a change did: how many it changed, facts for ``--json``, sentences for people,
    errors for stderr, and the exit code (0 unless part of the change failed)."""

    changed: int
    lines: Sequence[str] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    errors: Sequence[str] = ()
    exit_code: int = 0


def with_mode(command: Callable[..., R]) -> Callable[..., R]:
    """Give a changing command ``--dry-run``, ``--yes`` and ``--json`` (declared once, in
    that order after its own options); it receives them as one :class:`Mode` ``mode``.

    Put it below :func:`~postroom.cli.common.with_settings`, so the database options come last.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, dry_run: bool, yes: bool, as_json: bool, **kwargs: Any) -> R:
        return command(*args, mode=Mode(dry_run, yes, as_json), **kwargs)

    return replace_parameter(command, "mode", _MODE_OPTIONS, wrapper)


def run_change(
    wording: Wording,
    mode: Mode,
    *,
    select: Callable[[], Selection[Item]],
    preview: Callable[[str, Sequence[Item]], RenderableType],
    item_json: Callable[[Item], dict[str, Any]],
    apply: Callable[[], Done],
) -> None:
    """Select, preview, confirm, apply: the flow of every changing command.

    ``select``, ``preview``, ``item_json`` and ``apply`` are the caller's own: rows in
    PostgreSQL (outbox, inbox) or messages on a broker (dead letters) plug in alike; the
    module's docstring shows how. Exits 0 when nothing matches, 2 without ``--yes`` and
    without a terminal, 1 when the operator says no, and ``Done.exit_code`` when set.
    """
    dry_run, as_json, verb = mode.dry_run, mode.as_json, wording.verb
    chosen = select()
    matched = chosen.matched
    if matched == 0:
        if as_json:
            print_json(
                change_json(
                    verb, dry_run=dry_run, matched=0, changed=0, items=[], facts=chosen.facts
                )
            )
        else:
            nothing = wording.nothing or f"No {wording.what} match ({describe(wording.filters)})."
            say(f"{nothing} Nothing to do.")
        raise typer.Exit(0)
    sample = list(chosen.sample)
    if not as_json:
        shown = f"first {len(sample)} of {matched}" if matched > len(sample) else str(matched)
        console.print(preview(f"{wording.what.capitalize()} to {wording.verb} ({shown})", sample))
    items = [item_json(item) for item in sample]
    document = change_json(
        verb, dry_run=dry_run, matched=matched, changed=0, items=items, facts=chosen.facts
    )
    if dry_run:
        if as_json:
            print_json(document)
        else:
            say(
                f"Dry run: would {wording.verb} {matched} {wording.what}{wording.target}; "
                "nothing changed."
            )
        return
    confirm(f"{wording.verb.capitalize()} {matched} {wording.what} {wording.place}?", yes=mode.yes)
    done = apply()
    if as_json:
        print_json({**document, "changed": done.changed, **done.facts})
    else:
        for line in done.lines:
            say(line)
        for line in done.errors:
            warn(line)
    if done.exit_code:
        raise typer.Exit(done.exit_code)


def in_batches(
    connection: psycopg.Connection[Any],
    statement: str,
    params: Mapping[str, Any],
    advance: Advance | None = None,
) -> int:
    """Run ``statement`` again and again, one transaction each, until it changes nothing.

    The statement changes at most ``%(limit)s`` rows, and returns either nothing (its row
    count is taken) or one row: how many it changed and, optionally, the position it got
    to, which becomes ``%(after)s`` of the next batch. Returns how many rows changed in all;
    ``advance`` (a progress bar's) is told each batch's count.
    """
    values = dict(params)
    changed = 0
    while True:
        with connection.transaction():
            cursor = connection.execute(statement, values)
            row = cursor.fetchone() if cursor.description else None
            count = int(row[0]) if row else cursor.rowcount
        changed += count
        if advance is not None:
            advance(count)
        if count == 0:
            return changed
        if row is not None and len(row) > 1:
            values["after"] = int(row[1])


@dataclass(frozen=True)
class Statements:
    """A change of rows in PostgreSQL: how many match, the first few (``%(limit)s``), and
    one bounded batch of the change (at most ``limit`` rows, see :func:`in_batches`).

    ``start`` reads the batch statement's own parameters once the change is confirmed
    (for example where a cursor over positions stops).
    """

    count: str
    sample: str
    batch: str
    limit: int
    start: Callable[[psycopg.Connection[Any]], Mapping[str, Any]] | None = None


def change_rows(
    settings: Settings,
    wording: Wording,
    mode: Mode,
    statements: Statements,
    params: Mapping[str, Any],
    *,
    preview: Callable[[str | None, Sequence[dict[str, Any]], datetime], RenderableType],
    item_json: Callable[[Mapping[str, Any], datetime], dict[str, Any]],
    done: Callable[[int], Sequence[str]],
    facts: Callable[[psycopg.Connection[Any]], Mapping[str, Any]] | None = None,
) -> None:
    """:func:`run_change` on rows of the settings' database, one connection throughout.

    ``preview`` and ``item_json`` get the database's time with the rows (for their ages);
    ``facts`` are read before anything is counted and go into ``--json``.
    """
    with connect(settings) as connection:
        at = now(connection)

        counted: list[int] = []

        def select() -> Selection[dict[str, Any]]:
            extra = facts(connection) if facts else {}
            matched = int(scalar(connection, statements.count, params))
            counted.append(matched)
            limited = {**params, "limit": SAMPLE_ROWS}
            sample = query(connection, statements.sample, limited) if matched else []
            return Selection(matched, sample, extra)

        def apply() -> Done:
            start = statements.start(connection) if statements.start else {}
            batch = {**params, **start, "limit": statements.limit}
            with progress(f"{wording.verb} {wording.what}", counted[-1]) as advance:
                changed = in_batches(connection, statements.batch, batch, advance)
            return Done(changed, done(changed))

        run_change(
            wording,
            mode,
            select=select,
            preview=lambda title, sample: preview(title, sample, at),
            item_json=lambda row: item_json(row, at),
            apply=apply,
        )
