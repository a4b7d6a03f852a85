"""Every command, every option, bad values: one sentence (or click's usage error), exit 2.

The walk reads the real command tree (:func:`tests.support.bad_options.commands`), so a
command or option added later is walked too; an option of a kind with no bad values fails
the walk until they are added. The errors that are not bad usage (unreachable database,
a consumer module that raises on import, unexpected exceptions) and the boundary in the
console script are checked through the real ``postroom`` process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from postroom.cli.app import app
from postroom.cli.boundary import PostroomGroup
from postroom.config import Settings
from tests.support.bad_options import (
    UNREACHABLE_BROKER,
    UNREACHABLE_DATABASE,
    cases,
    commands,
    kept_logging,
    verdict,
    walk_env,
)
from tests.support.cli import run_postroom

COMMANDS = commands()
UNREACHABLE = {
    "POSTROOM_DATABASE_URL": UNREACHABLE_DATABASE,
    "POSTROOM_BROKER_URL": UNREACHABLE_BROKER,
}


def test_the_walk_finds_every_command_and_flags_options_it_has_no_bad_values_for() -> None:
    assert {"relay", "consume", "db downgrade", "outbox ls", "inbox forget"} <= set(COMMANDS)
    assert {"dead-letter requeue", "outbox purge", "db check"} <= set(COMMANDS)
    later = typer.Typer()

    @later.command()
    def tune(ratio: Annotated[float, typer.Option("--ratio")] = 0.5) -> None:
        """A command added later, with an option of a kind the walk does not know."""

    runs, uncovered = cases("tune", typer.main.get_command(later))
    assert runs == []
    assert uncovered == ["postroom tune ratio (kind 'number')"]


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_bad_values_of_every_option_are_one_sentence_and_exit_2(
    path: str, database_url: str
) -> None:
    runs, uncovered = cases(path, COMMANDS[path])
    assert not uncovered, "options without bad values in tests/support/bad_options.py: " + (
        ", ".join(uncovered)
    )
    runner = CliRunner()
    wrong = []
    with kept_logging():
        for case in runs:
            result = runner.invoke(app, list(case.args), env=walk_env(database_url))
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                wrong.append(f"{case} raised {result.exception!r}")
                continue
            problem = verdict(case, result.exit_code, result.stdout, result.stderr)
            if problem:
                wrong.append(problem)
    assert not wrong, "\n\n".join(wrong)


def test_the_console_script_reports_bad_values_as_one_sentence() -> None:
    for args, said in [
        (("db", "downgrade", "bogus", "--yes"), "revision 'bogus' is not one postroom ships"),
        (("outbox", "ls", "--older-than", "99999999999d"), "is longer than 36500d"),
        (("relay", "--batch-size", "99999999999999999999"), "more than 2,147,483,647"),
        (("db", "check", "--database-url", "postgresql://h:notaport/db"), "port is not a number"),
        (("db", "check", "--database-url", "postgresql://h/db?bogus=1"), "query option 'bogus'"),
    ]:
        result = run_postroom(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: "), result.stderr
        assert said in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_a_missing_database_url_says_how_to_set_it_and_help_still_works() -> None:
    result = run_postroom("outbox", "ls", clean=True)
    assert result.returncode == 2
    assert result.stderr == (
        "error: POSTROOM_DATABASE_URL is not set: export POSTROOM_DATABASE_URL="
        "postgresql://user:password@host:5432/dbname (or pass --database-url)\n"
    )
    assert Settings.from_env({}).database_url == ""
    helped = run_postroom("outbox", "ls", "--help", clean=True, env={"COLUMNS": "200"})
    assert helped.returncode == 0, helped.stderr
    assert "--database-url" in helped.stdout
    shown = run_postroom("db", "sql", clean=True)
    assert shown.returncode == 0, shown.stderr
    assert "CREATE TABLE" in shown.stdout


def test_version_and_help_text() -> None:
    version = run_postroom("--version", clean=True)
    assert version.returncode == 0
    assert version.stdout.startswith("postroom ")
    assert version.stdout.split()[1][0].isdigit()
    helped = run_postroom("--help", clean=True, env={"COLUMNS": "200"})
    assert "Exit codes: 0 success; 1 refused or aborted" in helped.stdout
    assert "--debug" in helped.stdout
    consume = run_postroom("consume", "--help", clean=True, env={"COLUMNS": "200"}).stdout
    assert "header:<name>" in consume
    assert "<str>" not in consume
    assert "<int>" not in consume
    assert "<bool>" not in consume
    assert "[default: 7d]" in consume
    relay = run_postroom("relay", "--help", clean=True, env={"COLUMNS": "200"}).stdout
    assert "[default: 24h]" in relay
    assert "DURATION" in relay


def test_unreachable_is_3_and_refused_is_2_without_a_terminal(tmp_path: Path) -> None:
    unreachable = run_postroom("outbox", "ls", env=UNREACHABLE)
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("error: cannot reach PostgreSQL at walk@127.0.0.1:1/none")
    assert len(unreachable.stderr.strip().splitlines()) == 1
    refused = run_postroom("db", "downgrade", "base", env=UNREACHABLE)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: not reverting postroom's tables without confirmation")


def test_a_consumer_module_that_fails_to_import_is_named_with_where(tmp_path: Path) -> None:
    (tmp_path / "walk_syntax.py").write_text("x = 1\ndef broken(:\n")
    (tmp_path / "walk_raises.py").write_text("import os\nraise RuntimeError('no config')\n")
    env = {**UNREACHABLE, "PYTHONPATH": str(tmp_path)}
    syntax = run_postroom("consume", "walk_syntax:consumer", env=env)
    assert syntax.returncode == 3
    assert syntax.stderr.startswith(
        "error: importing module 'walk_syntax' failed: SyntaxError: invalid syntax ("
        f"{tmp_path / 'walk_syntax.py'}:2)"
    )
    raises = run_postroom("consume", "walk_raises:consumer", env=env)
    assert raises.returncode == 3
    assert raises.stderr.startswith(
        "error: importing module 'walk_raises' failed: RuntimeError: no config ("
        f"{tmp_path / 'walk_raises.py'}:2)"
    )
    for result in (syntax, raises):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "PYTHONPATH" not in result.stderr
        assert "Traceback" not in result.stderr
    missing = run_postroom("consume", "walk_no_such_module:consumer", env=env)
    assert missing.returncode == 3
    assert "cannot find module 'walk_no_such_module'" in missing.stderr
    for debugged in (
        run_postroom("--debug", "consume", "walk_raises:consumer", env=env),
        run_postroom("consume", "walk_raises:consumer", env={**env, "POSTROOM_DEBUG": "1"}),
    ):
        assert debugged.returncode == 3
        assert "Traceback" in debugged.stderr
        assert "RuntimeError: no config" in debugged.stderr
        assert debugged.stderr.strip().splitlines()[-1].startswith("error: importing module")


def test_every_command_has_help_without_a_database_and_without_python_type_names() -> None:
    runner = CliRunner()
    for path in COMMANDS:
        result = runner.invoke(
            app, [*path.split(), "--help"], env={"POSTROOM_DATABASE_URL": None, "COLUMNS": "200"}
        )
        assert result.exit_code == 0, f"postroom {path} --help: {result.output}"
        assert f"Usage: postroom {path}" in result.stdout
        for python_name in ("<str>", "<int>", "<bool>", "<float>"):
            assert python_name not in result.stdout, f"postroom {path} --help shows {python_name}"


def test_unexpected_errors_and_interrupts_are_one_line_tracebacks_only_with_debug() -> None:
    boundary = typer.Typer(cls=PostroomGroup, pretty_exceptions_enable=False)

    @boundary.callback()
    def root(debug: Annotated[bool, typer.Option("--debug")] = False) -> None:
        """A root like postroom's."""

    @boundary.command()
    def crash() -> None:
        """Fail in a way no one planned for."""
        raise RuntimeError("lost postgresql://u:s3cretpw@h/db")

    @boundary.command()
    def interrupt() -> None:
        """Be stopped with Ctrl-C."""
        raise KeyboardInterrupt

    runner = CliRunner()
    crashed = runner.invoke(boundary, ["crash"])
    assert crashed.exit_code == 3
    assert crashed.stderr == (
        "error: unexpected RuntimeError: lost postgresql://u:***@h/db "
        "(run with --debug for the traceback)\n"
    )
    debugged = runner.invoke(boundary, ["--debug", "crash"])
    assert debugged.exit_code == 3
    assert "Traceback (most recent call last)" in debugged.stderr
    assert debugged.stderr.splitlines()[-1] == (
        "error: unexpected RuntimeError: lost postgresql://u:***@h/db"
    )
    stopped = runner.invoke(boundary, ["interrupt"])
    assert (stopped.exit_code, stopped.stderr) == (130, "interrupted\n")


def test_a_kafka_setting_librdkafka_does_not_know_is_one_sentence() -> None:
    result = run_postroom(
        "dead-letter", "ls", "--consumer", "walk", "--broker-url", "kafka://127.0.0.1:1?bogus=1"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "error: the Kafka client rejected the settings of the broker URL"
    )
    assert 'No such configuration property: "bogus"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
