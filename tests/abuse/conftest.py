"""Fixtures of the abuse suite, and its report: a table after the run, and JSON on disk.

``stage`` is one broker's shared relay and consumer (session-scoped, parametrized by
broker through ``indirect``), ``planted`` the secrets planted in every URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.abuse.harness import (
    OUTCOMES,
    PROFILE,
    REPO_ROOT,
    Outcome,
    Secrets,
    Stage,
    add_amqp_user,
    delete_amqp_user,
    report_table,
    write_report,
)
from tests.support.services import kafka_available, rabbitmq_available


@pytest.fixture(scope="session")
def planted() -> Iterator[Secrets]:
    """The session's secrets; its RabbitMQ user exists for the session."""
    rabbitmq_available()
    made = Secrets()
    add_amqp_user(made)
    yield made
    delete_amqp_user(made)


@pytest.fixture(scope="session")
def stage(
    request: pytest.FixtureRequest,
    engine: Engine,
    database_url: str,
    planted: Secrets,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stage]:
    """One broker's relay and consumer for every case (``indirect`` parameter: the broker)."""
    broker = str(request.param)
    # The broker answers (probed with retries; fails unless the run asks to skip it).
    {"rabbitmq": rabbitmq_available, "kafka": kafka_available}[broker]()
    log_dir = tmp_path_factory.mktemp(f"abuse-{broker}")
    opened = Stage(
        broker, engine=engine, database_url=database_url, planted=planted, log_dir=log_dir
    )
    try:
        yield opened.open()
    finally:
        opened.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A case that fails joins the table too, with the first line of its failure."""
    report = yield
    if report.when == "call" and report.failed:
        callspec = getattr(item, "callspec", None)
        broker = str(callspec.params.get("stage", "-")) if callspec is not None else "-"
        reason = str(call.excinfo.value).strip().splitlines()[0] if call.excinfo else "?"
        OUTCOMES.append(Outcome(item.name, broker, f"FAILED: {reason[:70]}", "-", None, None))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the abuse table and write it as JSON, if any case ran."""
    if not OUTCOMES:
        return
    path = Path(os.environ.get("POSTROOM_ABUSE_REPORT") or REPO_ROOT / ".abuse" / "report.json")
    write_report(path, OUTCOMES)
    terminalreporter.section(f"abuse suite: profile {PROFILE.name}")
    terminalreporter.write_line(report_table(OUTCOMES))
    terminalreporter.write_line(f"written to {path}")
