"""The names of postroom's tables: their defaults and the rule every name must follow.

A leaf module, so settings can check names without importing the table definitions.
"""

from __future__ import annotations

import re
from typing import Final

from postroom.errors import InvalidIdentifierError

DEFAULT_SCHEMA: Final = "postroom"
DEFAULT_OUTBOX_TABLE: Final = "outbox"
DEFAULT_INBOX_TABLE: Final = "inbox"

_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,43}")


def validate_identifier(name: object, what: str) -> str:
    """Return ``name`` if it is a plain lower-case SQL identifier, else raise.

    Names are also quoted wherever they reach SQL; this check keeps them readable in
    ``psql`` and short enough for the index names derived from them.
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidIdentifierError(
            f"{what} {name!r} is not a valid name: use 1-44 characters of lower-case letters, "
            "digits and '_', starting with a letter or '_'"
        )
    return name


def validate_table_names(schema: str | None, outbox: str, inbox: str) -> None:
    """Raise InvalidIdentifierError unless the three names can name postroom's tables."""
    if schema is not None:
        validate_identifier(schema, "schema name")
    validate_identifier(outbox, "outbox table name")
    validate_identifier(inbox, "inbox table name")
    if outbox == inbox:
        raise InvalidIdentifierError("the outbox and inbox tables need different names")
