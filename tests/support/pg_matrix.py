"""The PostgreSQL version matrix: which server a run is on, and which one it was meant for.

``make test`` runs the suite on the machine's PostgreSQL and a short profile of it on a
private PostgreSQL 18 (``make test-pg18`` runs the whole integration suite there). Those runs
set ``POSTROOM_TEST_PG_MAJOR`` to the major version they mean to test, so a run that reached
another server by mistake fails instead of passing on the wrong version.
"""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.engine import Engine

#: The oldest PostgreSQL major version postroom supports (the README says the same).
OLDEST_SUPPORTED_MAJOR = 13

#: The variable naming the major version a run is meant to test.
EXPECTED_MAJOR_VARIABLE = "POSTROOM_TEST_PG_MAJOR"


def server_major(engine: Engine) -> int:
    """The major version of the PostgreSQL server ``engine`` talks to (e.g. 15 or 18)."""
    with engine.connect() as connection:
        number = int(connection.execute(text("SHOW server_version_num")).scalar_one())
    return number // 10_000


def expected_major() -> int | None:
    """The major version ``POSTROOM_TEST_PG_MAJOR`` asks for, or None when it is not set."""
    value = os.environ.get(EXPECTED_MAJOR_VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(
            f"{EXPECTED_MAJOR_VARIABLE} must be a PostgreSQL major version such as 18, "
            f"got {value!r}; set it to a number or unset it"
        )
    return int(value)
