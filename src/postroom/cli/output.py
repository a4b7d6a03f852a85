"""What the operator commands share: the database connection, confirmation, and output.

People get rich tables and sentences; scripts get ``--json`` (one JSON document on
stdout, with the same facts as the table). Prompts and errors go to stderr, so a
``--json`` command's stdout always parses.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn, cast

import psycopg
import typer
from psycopg.rows import dict_row
from rich.console import RenderableType
from rich.text import Text

from postroom.cli.common import EXIT_FAILED, console, error_console, fail, user_errors
from postroom.cli.options import DryRun as DryRun
from postroom.cli.options import Json as Json
from postroom.cli.options import Yes as Yes
from postroom.cli.tables import FittedTable as FittedTable
from postroom.cli.tables import cell
from postroom.cli.tables import timestamp as timestamp
from postroom.cli.text import printable as printable
from postroom.config import Settings, parse_duration
from postroom.database import readable_errors
from postroom.errors import EXIT_USAGE as EXIT_USAGE
from postroom.errors import ConfigurationError
from postroom.urls import psycopg_conninfo

#: What :func:`printable` keeps in a block of several lines (an error, a payload).
NEWLINE = "\n"


@contextlib.contextmanager
def connect(settings: Settings) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """A connection to the settings' database; failures become sentences (exit 3).

    Each ``with connection.transaction()`` block commits on its own; nothing else is
    left open.
    """
    with user_errors(), readable_errors(settings.database_url):
        connection = psycopg.connect(
            psycopg_conninfo(settings.database_url),
            connect_timeout=10,
            autocommit=True,
            application_name="postroom-cli",
        )
        with connection:
            yield connection


def now(connection: psycopg.Connection[Any]) -> datetime:
    """The database's current time (what row ages are measured against)."""
    return cast(datetime, scalar(connection, "SELECT now()", {}))


def scalar(connection: psycopg.Connection[Any], statement: str, params: Mapping[str, Any]) -> Any:
    """The first column of the statement's first row (None without a row)."""
    row = connection.execute(statement, params).fetchone()
    return None if row is None else row[0]


def query(
    connection: psycopg.Connection[Any], statement: str, params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The statement's rows, each a dict by column name."""
    with connection.cursor(row_factory=dict_row) as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall()


def duration(text: str | None, option: str) -> float | None:
    """Seconds from a duration option's text (None stays None); bad syntax exits 2."""
    if text is None:
        return None
    try:
        return parse_duration(text, what=option)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)


def parse_uuid(text: str) -> uuid.UUID:
    """A message id (the ``postroom-id`` of logs and brokers) from the command line, in any
    spelling of a UUID (upper case, braces, ``urn:uuid:``, no hyphens, surrounding spaces);
    anything else exits 2 with a sentence."""
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        fail(
            f"{text!r} is not a message id; ids are UUIDs such as "
            "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b (see `postroom outbox ls`)",
            EXIT_USAGE,
        )


def confirm(question: str, *, yes: bool) -> None:
    """Go on if ``yes`` or the person at the terminal agrees; otherwise exit, changing nothing.

    Without a terminal there is nobody to ask: the command refuses (exit 2) and says how
    to go ahead.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        fail(
            "not changing anything without confirmation, and there is no terminal to ask: "
            "run it again with --yes (or POSTROOM_YES=true) to go ahead, "
            "or with --dry-run to only look",
            EXIT_USAGE,
        )
    if not typer.confirm(question, default=False, err=True):
        error_console.print("Nothing changed.")
        raise typer.Exit(1)


def print_json(document: Any) -> None:
    """Print ``document`` as JSON on stdout (datetimes ISO 8601, ids and bytes as text)."""
    typer.echo(json.dumps(document, default=_json_default, indent=2, ensure_ascii=False))


def _json_default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def say(text: str) -> None:
    """Print a sentence for people: no markup is read from ``text``, and control characters
    other than line breaks and tabs are shown as escapes (see :func:`printable`)."""
    console.print(printable(text, keep="\n\t"), markup=False, highlight=False)


def warn(text: str) -> None:
    """Print a sentence on stderr, as :func:`say` prints on stdout."""
    error_console.print(printable(text, keep="\n\t"), markup=False, highlight=False)


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    free: Collection[str] = (),
    optional: Sequence[str] = (),
) -> FittedTable:
    """A table of ``rows`` that fits the screen (see :mod:`postroom.cli.tables`); the
    columns named in ``free`` hold free text (keys, errors, topics) and may be shortened,
    those in ``optional`` may be left out (in that order) before rows become records."""
    return FittedTable(title, columns, rows, free=free, optional=optional)


def age(seconds: float | None) -> str:
    """A duration as people say it: ``45s``, ``3m 12s``, ``2h 5m``, ``4d 3h``; or '-'."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def seconds_between(later: datetime, earlier: datetime | None) -> float | None:
    """``later - earlier`` in seconds, or None when ``earlier`` is None."""
    return None if earlier is None else (later - earlier).total_seconds()


def ranges(numbers: Sequence[int]) -> str:
    """``0-15, 20, 32-40`` for a sorted list of integers."""
    parts: list[str] = []
    start = previous = None
    for n in [*numbers, None]:
        if start is not None and previous is not None and n == previous + 1:
            previous = n
            continue
        if start is not None and previous is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = n
    return ", ".join(parts) or "-"


def payload_view(payload: bytes, content_type: str) -> tuple[str, Any]:
    """How to show a payload: ``("json", value)``, ``("text", str)`` or ``("binary", hex)``."""
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or media.endswith("+json")
    if is_json:
        with contextlib.suppress(ValueError):
            return "json", json.loads(payload)
    if is_json or media.startswith("text/") or media.endswith("+xml"):
        with contextlib.suppress(UnicodeDecodeError):
            return "text", payload.decode()
    return "binary", payload[:512].hex(" ")


def describe(filters: Mapping[str, Any]) -> str:
    """The filters given, as words: ``topic orders, state dead, older than 1h``."""
    words = [
        f"{name} {_words(value)}" for name, value in filters.items() if value not in (None, [], ())
    ]
    return "; ".join(words) or "no filter"


def _words(value: Any) -> str:
    values = value if isinstance(value, list | tuple) else [value]
    return ", ".join(printable(str(v)) for v in values)


def list_json(items: Sequence[Mapping[str, Any]], matched: int, **context: Any) -> dict[str, Any]:
    """The ``--json`` document of every listing command: ``{...context, "matched": how many
    match, "count": how many are in "items", "items": [...]}``."""
    return {**context, "matched": matched, "count": len(items), "items": list(items)}


def change_json(
    action: str,
    *,
    dry_run: bool,
    matched: int,
    changed: int,
    items: Sequence[Mapping[str, Any]],
    facts: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``--json`` document of every changing command: ``{"action", "dry_run",
    "matched", "changed", "count", "items": [the first few matched], ...facts}``."""
    return {
        "action": action,
        "dry_run": dry_run,
        "matched": matched,
        "changed": changed,
        "count": len(items),
        "items": list(items),
        **facts,
    }


def failed(message: str) -> NoReturn:
    """Exit 3 with ``message`` (an operation that could not be done)."""
    fail(message, EXIT_FAILED)


def show_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Print ``(label, value)`` pairs as two aligned columns (for one item's every field)."""
    width = max((len(label) for label, _ in fields), default=0) + 2
    for label, value in fields:
        console.print(Text.assemble((label.ljust(width), "bold"), cell(value)))


def show_headers_and_payload(headers: Mapping[str, Any], payload: bytes, content_type: str) -> str:
    """Print message headers and the payload (pretty JSON, text, or the first bytes in hex);
    returns the payload's kind (``json``, ``text`` or ``binary``)."""
    if headers:
        rows = sorted(headers.items())
        console.print(table("Headers", ["name", "value"], rows, free={"name", "value"}))
    else:
        say("Headers: none")
    kind, view = payload_view(payload, content_type)
    say(f"\nPayload ({kind}):")
    if kind == "json":
        say(json.dumps(view, indent=2, ensure_ascii=False))
    elif kind == "text":
        say(str(view))
    else:
        shown = "first 512 bytes" if len(payload) > 512 else f"{len(payload)} bytes"
        say(f"{view}\n({shown}, hex)")
    return kind


def show_listing(
    rendered: RenderableType,
    items: list[dict[str, Any]],
    matched: int,
    newest_first: bool,
    as_json: bool,
    *,
    what: tuple[str, str],
    filters: Mapping[str, Any],
    head: Mapping[str, Any] | None = None,
) -> None:
    """Print a listing of ``what`` (the family and its noun, e.g. ``("outbox", "rows")``):
    :func:`list_json` with ``order`` and ``head`` with ``--json``; otherwise its table and
    how much of the match it shows, or that nothing matched."""
    shown = len(items)
    order = "newest first" if newest_first else "oldest first"
    family, noun = what
    if as_json:
        print_json(list_json(items, matched, **(head or {}), order=order))
    elif not shown:
        say(f"No {family} {noun} match ({describe(filters)}).")
    else:
        console.print(rendered)
        more = "; raise --limit to see more" if matched > shown else ""
        say(f"{shown} of {matched} matching {noun}, {order}{more}.")
