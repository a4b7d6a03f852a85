"""Ids and consumer names as operators type them: checked, and put in the stores' form.

Message ids reach the inbox normalised (:func:`postroom.message.normalize_id`: a UUID in any
spelling becomes its lower-case hyphenated form; other producers' ids stay as they are), so
the ids typed here are normalised the same way before they are looked up. What cannot be an
id or a consumer name is bad usage (exit 2); a well-formed one that is not there is "not
found" (exit 3), said by the command that looked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import psycopg

from postroom.cli.common import fail
from postroom.cli.output import EXIT_USAGE, failed, scalar
from postroom.consumer.decoding import MAX_ID_CHARS, MAX_NAME_CHARS
from postroom.message import TOPIC_PATTERN, normalize_id
from postroom.schema import operations_sql as sql
from postroom.schema.tables import Tables

#: Hex groups joined by hyphens (with 24 to 40 hex digits, checked apart): meant as a UUID.
_UUID_ATTEMPT: Final = re.compile(r"(?i)(?:urn:uuid:)?\{?[0-9a-f]+(?:-[0-9a-f]*){3,}\}?")
_HEX: Final = re.compile(r"(?i)[0-9a-f]")
#: The canonical form :func:`~postroom.message.normalize_id` gives every UUID.
_UUID_TEXT: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Known consumers named in an error, at most.
_NAMES_SHOWN: Final = 20


def consumer_name(name: str) -> str:
    """``name`` if a consumer can be called so; exit 2 naming the rule otherwise."""
    if not name.strip():
        # An empty name must never widen a command to every consumer.
        fail("--consumer is empty; give the consumer's name, e.g. --consumer billing", EXIT_USAGE)
    if len(name) > MAX_NAME_CHARS or not TOPIC_PATTERN.fullmatch(name) or name in {".", ".."}:
        fail(
            f"no consumer can be called {_shown(name)}: consumer names have only letters, "
            f"digits, '.', '_' and '-' (at most {MAX_NAME_CHARS} characters); give the name "
            "of your postroom.Consumer, e.g. --consumer billing",
            EXIT_USAGE,
        )
    return name


def _shown(text: str) -> str:
    """Typed text for an error sentence: quoted, control characters and non-ASCII escaped."""
    return ascii(text)


def inbox_message_id(text: str, listed_by: str = "postroom inbox ls") -> str:
    """A message id as the inbox records it; exit 2 if ``text`` cannot be one.

    Any spelling of a UUID becomes its canonical form; other producers' ids (any text up to
    1000 characters) are kept as typed, without surrounding spaces.
    """
    given = text.strip()
    if not given:
        fail(f"a message id is empty; give the id as `{listed_by}` shows it", EXIT_USAGE)
    if "\x00" in given or len(given) > MAX_ID_CHARS:
        fail(
            f"{_shown(given[:60])}… is not a message id: ids are at most {MAX_ID_CHARS} "
            f"characters without NUL; give the id as `{listed_by}` shows it",
            EXIT_USAGE,
        )
    normal = normalize_id(given)
    if not _UUID_TEXT.fullmatch(normal) and _looks_like_uuid(given):
        fail(
            f"{_shown(given)} is not a valid UUID (a UUID has 32 hex digits, as "
            "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b); check for a missing or extra character",
            EXIT_USAGE,
        )
    return normal


def _looks_like_uuid(text: str) -> bool:
    """Hex groups joined by hyphens, about as many digits as a UUID: a UUID mistyped."""
    digits = len(_HEX.findall(text.removeprefix("urn:uuid:")))
    return bool(_UUID_ATTEMPT.fullmatch(text)) and 24 <= digits <= 40


def inbox_message_ids(texts: Sequence[str] | None) -> list[str] | None:
    """:func:`inbox_message_id` of each, without repeats (None stays None)."""
    if not texts:
        return None
    return list(dict.fromkeys(inbox_message_id(text) for text in texts))


def require_inbox_consumer(
    connection: psycopg.Connection[Any], tables: Tables, consumer: str, where: str
) -> None:
    """Exit 3 naming the known consumers unless ``consumer`` has inbox entries."""
    if scalar(connection, sql.inbox_has_consumer_sql(tables), {"consumer": consumer}):
        return
    names = [
        row[0]
        for row in connection.execute(
            sql.inbox_consumers_sql(tables), {"limit": _NAMES_SHOWN + 1}
        ).fetchall()
    ]
    if not names:
        known = "the inbox is empty (no consumer has handled a message yet)"
    else:
        more = ", …" if len(names) > _NAMES_SHOWN else ""
        known = f"known consumers: {', '.join(names[:_NAMES_SHOWN])}{more}"
    failed(f"no consumer named {_shown(consumer)} in the inbox {where}; {known}")


def require_inbox_ids(
    connection: psycopg.Connection[Any],
    tables: Tables,
    consumer: str,
    message_ids: list[str],
    doing: str,
) -> None:
    """Exit 3 naming the ids ``consumer`` has no inbox entry for; ``doing`` ends the sentence."""
    present = {
        row[0]
        for row in connection.execute(
            sql.inbox_ids_present_sql(tables), {"consumer": consumer, "message_ids": message_ids}
        ).fetchall()
    }
    absent = [i for i in message_ids if i not in present]
    if absent:
        shown = ", ".join(absent[:10]) + (
            f" and {len(absent) - 10} more" if len(absent) > 10 else ""
        )
        failed(
            f"consumer {_shown(consumer)} has no inbox entry for message id {shown}; "
            f"{doing} "
            f"(`postroom inbox ls --consumer {consumer}` lists the messages it handled)"
        )
