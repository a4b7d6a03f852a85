"""The version matrix: each run is on a supported PostgreSQL, and on the one it names."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from tests.support.pg_matrix import OLDEST_SUPPORTED_MAJOR, expected_major, server_major


def test_the_server_is_a_supported_postgresql_and_the_one_the_run_names(engine: Engine) -> None:
    major = server_major(engine)

    assert major >= OLDEST_SUPPORTED_MAJOR, f"PostgreSQL {major} is older than postroom supports"
    wanted = expected_major()
    if wanted is not None:
        assert major == wanted, (
            f"this run is meant for PostgreSQL {wanted} but reached PostgreSQL {major}; "
            "check POSTROOM_DATABASE_URL's port"
        )
