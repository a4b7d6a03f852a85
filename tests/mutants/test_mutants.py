"""The short form of the mutant check, run by ``make test``: each mutant against its
quickest detecting test.

The run without the mutant is skipped here: each quick test also runs, unmutated, in the
same ``make test``, so a broken test fails there. ``make mutants`` runs the full sets with
both runs.
"""

from __future__ import annotations

import pytest

from tests.mutants.harness import Verdict, judge
from tests.mutants.mutants import MUTANTS, Mutant

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_quickest_detecting_test_catches_the_mutant(
    mutant: Mutant, verdicts: list[Verdict]
) -> None:
    verdict = judge(mutant, mutant.quick, check_clean=False)
    verdicts.append(verdict)
    if verdict.skipped:
        pytest.skip(f"{mutant.quick}: {verdict.reason}")
    assert verdict.caught, f"{mutant.name} ({mutant.breaks}) was not caught: {verdict.reason}"


def test_every_mutant_has_its_own_name_and_its_quick_test_among_its_detecting_tests() -> None:
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), names
    for mutant in MUTANTS:
        assert mutant.quick in mutant.detecting, mutant.name
        assert len(set(mutant.detecting)) == len(mutant.detecting), mutant.name
