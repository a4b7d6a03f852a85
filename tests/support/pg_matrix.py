"""The PostgreSQL version matrix: which server a run is on, which one it was meant for, and
the private servers ``scripts/services`` starts.

``make test`` runs the suite on the machine's PostgreSQL and a short profile of it on a
private PostgreSQL 18 (``make test-pg18`` runs the whole integration suite there). Those runs
set ``POSTROOM_TEST_PG_MAJOR`` to the major version they mean to test, so a run that reached
another server by mistake fails instead of passing on the wrong version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


#: The project's service script, which starts the private servers.
SERVICES_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "services"


def run_services(
    database_url: str, *args: str, script: Path = SERVICES_SCRIPT
) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/services ARGS`` (or ``script``) for ``database_url``; its output,
    stdout and stderr."""
    env = {**os.environ, "POSTROOM_DATABASE_URL": database_url, "PYTHON": sys.executable}
    return subprocess.run(
        [str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def remove_private_server(database_url: str, port: int) -> None:
    """Stop the private server scripts/services started on ``port`` and delete its files."""
    run_services(database_url, "stop-postgres", str(port))
    state = SERVICES_SCRIPT.parents[1] / ".services"
    shutil.rmtree(state / f"postgres-{port}", ignore_errors=True)
    (state / f"postgres-{port}.log").unlink(missing_ok=True)
