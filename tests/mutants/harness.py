"""Run chosen tests against a mutant and judge whether the suite caught it.

``python -m tests.mutants.harness`` (``make mutants``) runs every mutant against all of its
detecting tests, one test per pytest run, and prints a table; ``--quick`` runs only each
mutant's quickest test and skips the runs without the mutant. A test *catches* a mutant
when it passes without the mutant and fails with it: pytest exits with status 1 and names
the test as FAILED (an error in set-up, a collection error, a skip or an interrupted run
is not a catch). The run without the mutant is what keeps a broken test from counting.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.mutants.mutants import LOG_VARIABLE, MUTANTS, VARIABLE, Mutant, named

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The directory whose sitecustomize.py applies the mutant in every process.
BOOT = Path(__file__).resolve().parent / "boot"
#: Longest a single pytest run may take (each test has its own, shorter, timeout).
RUN_TIMEOUT = 600.0
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (.*)$", re.MULTILINE)
#: pytest's exit status when tests ran and some failed.
TESTS_FAILED = 1


@dataclass(frozen=True)
class PytestRun:
    """The outcome of one pytest run."""

    status: int
    output: str
    seconds: float
    applied_in: int
    """Processes that applied the mutant (0 for a run without one)."""

    def named(self, kind: str) -> set[str]:
        """Node ids pytest's short summary lists as ``kind`` (FAILED or ERROR)."""
        return {node for found, node in _SUMMARY.findall(self.output) if found == kind}

    def skips(self) -> list[str]:
        """The reasons of the tests pytest's short summary lists as skipped."""
        return _SKIPPED.findall(self.output)

    def tail(self, lines: int = 25) -> str:
        """The last lines of the output, for a report."""
        return "\n".join(self.output.splitlines()[-lines:])


@dataclass(frozen=True)
class Verdict:
    """Whether one test caught one mutant, and how long the mutant run took."""

    mutant: str
    test: str
    caught: bool
    seconds: float
    reason: str
    """Why it was not caught (or ``caught``), with the run's tail when that helps."""
    processes: int = 0
    """Python processes of the mutant run that applied the mutant (pytest, relays, ...)."""
    skipped: bool = False
    """The test was skipped (a service it needs is missing and skipping was asked for)."""


def run_pytest(tests: Sequence[str], mutant: str | None = None) -> PytestRun:
    """Run ``pytest tests`` in a new process, under ``mutant`` if one is named."""
    env = dict(os.environ)
    for name in (VARIABLE, LOG_VARIABLE):
        env.pop(name, None)
    env["POSTROOM_FAULTS_BROKERS"] = "both"  # a fault scenario named by its id runs as named
    with tempfile.TemporaryDirectory(prefix="postroom-mutant-") as directory:
        log = Path(directory) / "applied.log"
        if mutant is not None:
            inherited = env.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOT), inherited]))
            env[VARIABLE] = mutant
            env[LOG_VARIABLE] = str(log)
        command = [sys.executable, "-m", "pytest", "-q", "--no-header", "-rfEs"]
        command += ["-p", "no:cacheprovider", *tests]
        started = time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
            status, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            status, output = -1, f"pytest ran longer than {RUN_TIMEOUT:g} s: {exc}"
        seconds = time.monotonic() - started
        applied = len(log.read_text().splitlines()) if log.exists() else 0
    return PytestRun(status, output, seconds, applied)


def judge(mutant: Mutant, test: str, *, check_clean: bool = True) -> Verdict:
    """Run ``test`` without (if ``check_clean``) and with ``mutant``; did it catch it?"""
    if check_clean:
        clean = run_pytest([test])
        if clean.status != 0:
            reason = f"fails without the mutant too (status {clean.status})\n{clean.tail()}"
            return Verdict(mutant.name, test, False, 0.0, reason)
    run = run_pytest([test], mutant.name)
    if run.status == 0 and run.skips():
        reason = f"skipped: {run.skips()[0]}"
        return Verdict(mutant.name, test, False, run.seconds, reason, run.applied_in, True)
    if run.applied_in == 0:
        reason = f"the mutant was not applied (status {run.status})\n{run.tail()}"
        return Verdict(mutant.name, test, False, run.seconds, reason, run.applied_in)
    if run.status != TESTS_FAILED or test not in run.named("FAILED") or run.named("ERROR"):
        reason = f"not failed by the test (status {run.status})\n{run.tail()}"
        return Verdict(mutant.name, test, False, run.seconds, reason, run.applied_in)
    return Verdict(mutant.name, test, True, run.seconds, "caught", run.applied_in)


def table(verdicts: Iterable[Verdict]) -> str:
    """A plain-text table: mutant, detecting test, caught, seconds of the mutant run, and
    the processes that applied the mutant."""
    rows = [("mutant", "detecting test", "caught", "seconds", "processes")]
    rows += [
        (
            v.mutant,
            v.test.rsplit("/", 1)[-1],
            "yes" if v.caught else "skipped" if v.skipped else "NO",
            f"{v.seconds:.1f}",
            str(v.processes),
        )
        for v in verdicts
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if column >= 3 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mutants; exit status 1 unless every test caught its mutant."""
    parser = argparse.ArgumentParser(prog="python -m tests.mutants.harness", description=__doc__)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="each mutant's quickest test only, without the run that checks it passes",
    )
    options = parser.parse_args(argv)
    mutants = [named(name) for name in options.names] or list(MUTANTS)
    verdicts: list[Verdict] = []
    for mutant in mutants:
        tests = [mutant.quick] if options.quick else list(mutant.detecting)
        for test in tests:
            verdict = judge(mutant, test, check_clean=not options.quick)
            verdicts.append(verdict)
            if not verdict.caught:
                print(f"{mutant.name}: {test}: {verdict.reason}\n", flush=True)
    print(table(verdicts), flush=True)
    return 0 if all(v.caught for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
