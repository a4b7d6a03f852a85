"""The short mutant check's table, printed at the end of the pytest run."""

from __future__ import annotations

import pytest

from tests.mutants.harness import Verdict, table

_VERDICTS = pytest.StashKey[list[Verdict]]()


@pytest.fixture
def verdicts(request: pytest.FixtureRequest) -> list[Verdict]:
    """The list the short mutant check adds its verdicts to, for the table at the end."""
    return request.config.stash.setdefault(_VERDICTS, [])


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Print the mutants' table when any ran."""
    found = config.stash.get(_VERDICTS, [])
    if found:
        terminalreporter.section("mutants (short form; the full set: make mutants)")
        terminalreporter.write_line(table(found))
