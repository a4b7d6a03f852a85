"""scripts/services: a private PostgreSQL where nothing answers, stopped only on request."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg

from tests.support.network import address, free_port, listens
from tests.support.pg_matrix import SERVICES_SCRIPT, remove_private_server, run_services


def test_a_private_postgresql_starts_where_nothing_answers_and_stops_on_request() -> None:
    port = free_port()
    url = f"postgresql://app@127.0.0.1:{port}/shop"
    try:
        started = run_services(url)
        assert started.returncode == 0, started.stderr
        line = started.stdout.splitlines()[0]
        assert f"up  127.0.0.1:{port}  private PostgreSQL 18" in line
        assert "started now" in line
        assert f"stop: scripts/services stop-postgres {port}" in line
        assert "database shop created" in line

        conninfo = f"host=127.0.0.1 port={port} user=app dbname=shop connect_timeout=5"
        with psycopg.connect(conninfo) as connection:
            row = connection.execute(
                "SELECT current_user, current_database(), current_setting('server_version_num')"
            ).fetchone()
        assert row is not None
        assert row[:2] == ("app", "shop")
        assert int(row[2]) // 10_000 == 18

        again = run_services(url, "status")
        assert "private PostgreSQL 18" in again.stdout.splitlines()[0]

        stopped = run_services(url, "stop-postgres", str(port))
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped the private PostgreSQL on port {port}" in stopped.stdout
        assert not listens(port)
    finally:
        remove_private_server(url, port)


def test_stop_postgres_leaves_a_server_it_did_not_start_running(
    database_url: str, tmp_path: Path
) -> None:
    host, port = address(database_url, 5432)
    # The script as another checkout holds it: whoever started the test database's server
    # (the machine, or this checkout's own scripts/services), that copy did not.
    elsewhere = tmp_path / "scripts" / "services"
    elsewhere.parent.mkdir()
    shutil.copy2(SERVICES_SCRIPT, elsewhere)

    stopped = run_services(database_url, "stop-postgres", str(port), script=elsewhere)

    assert stopped.returncode == 0, stopped.stderr
    assert "left alone" in stopped.stdout
    assert listens(port, host)
