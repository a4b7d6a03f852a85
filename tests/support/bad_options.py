"""Bad values for every option of the real ``postroom`` command tree, by the option's kind.

:func:`commands` walks the click command tree typer builds from the app, so a command
added later is walked too. :func:`kind_of` names what an option or argument takes;
:data:`BAD_VALUES` holds the bad values of each kind. An option of a kind with no entry
there is reported by :func:`cases` (add its bad values, or an empty tuple for free text
that every value is valid for). :data:`GOOD_VALUES` fills the other required parameters
so that only the bad value can be wrong. :func:`verdict` judges what the command printed;
:func:`kept_logging` undoes the logging set-up of commands run in the test's process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import structlog
import typer

from postroom.cli.app import app

#: Bad values by kind: each must be refused with one sentence and exit 2.
BAD_VALUES: Mapping[str, tuple[str, ...]] = {
    "integer": ("abc", "-5", "99999999999999999999"),
    "duration": ("forever", "99999999999d", "-1s"),
    "choice": ("bogus",),
    "database-url": ("http://x", "postgresql://h:notaport/db", "postgresql://h/db?bogus=1"),
    "broker-url": ("http://x", "postgresql://h:notaport/db", "amqp://h:notaport/"),
    "identifier": ("Bad-Name", "x" * 70),
    "message-id": ("not-an-id", "[/x]"),
    "consumer-name": ("", "a{x}"),
    "target": ("nocolon", ".relative:consumer"),
    "revision": ("bogus",),
    "role-name": ("x" * 64,),
    "text:metrics_host": ("not a host!",),
    "text:log_format": ("bogus",),
    "text:consumer_id_source": ("bogus", "header:"),
    "text:cloudevents": ("orders created", "orders,,payments"),
    "text:cloudevents_source": (" ",),
    # Free text: any value is a valid filter, name or key.
    "text:relay_id": (),
    "text:error": (),
    "text:topic": (),
    "text:key": (),
    # Ids as a consumer recorded them (inbox, dead letters): any text the broker carried, but
    # not empty, not over 1000 characters, and not a UUID with a digit missing.
    "recorded-id": ("", "x" * 1001, "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8"),
}

#: Values for required parameters that are not the one under test (valid, harmless).
GOOD_VALUES: Mapping[str, str] = {
    "target": "walk_no_such_module:consumer",
    "revision": "base",
    "message-id": "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b",
    "recorded-id": "walk-message",
    "consumer-name": "walk-consumer",
    "duration": "7d",
}

#: A schema no test creates: a wrongly accepted value meets no tables (exit 3), so the
#: walk changes nothing, while checks made after connecting still run.
NO_TABLES = "walk_bad_options_no_tables"
#: A broker where nothing answers: a wrongly accepted value fails fast (exit 3).
UNREACHABLE_BROKER = "amqp://walk:walk@127.0.0.1:1/"
#: A database where nothing answers (for checks that must come before connecting).
UNREACHABLE_DATABASE = "postgresql://walk@127.0.0.1:1/none"


def walk_env(database_url: str) -> dict[str, str]:
    """The environment the walk's commands run in: the test database without tables."""
    return {
        "POSTROOM_DATABASE_URL": database_url,
        "POSTROOM_SCHEMA": NO_TABLES,
        "POSTROOM_BROKER_URL": UNREACHABLE_BROKER,
    }


_IDENTIFIERS = frozenset({"schema", "outbox_table", "inbox_table"})
#: Commands whose ids are postroom's UUIDs (the others take ids as consumers recorded them).
_UUID_COMMANDS = frozenset({"outbox"})


@dataclasses.dataclass(frozen=True)
class Case:
    """One run: ``args`` give ``parameter`` (of ``command``) the bad ``value``."""

    command: str
    parameter: str
    value: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"postroom {self.command} ({self.parameter}={self.value!r})"


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """Run commands in this process and put back the logging they configure (a service
    command sets structlog and the root logger up to write to its own, captured, stderr)."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


def commands() -> dict[str, Any]:
    """Every runnable command of the real app by its path (``outbox ls``), walked live."""
    found: dict[str, Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, (*path, name))
        else:
            found[" ".join(path)] = command

    walk(typer.main.get_command(app), ())
    return found


def kind_of(param: Any, path: str) -> str:
    """What ``param`` (of command ``path``) takes: ``flag``, ``integer``, ``duration``..."""
    name = str(param.name)
    annotation = param.type_descriptor.annotation
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    if getattr(param, "is_flag", False):
        return "flag"
    if param.type_descriptor.is_choice:
        return "choice"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if param.metavar == "DURATION" or name.endswith(("_than", "_lease", "_retention")):
        return "duration"
    if name == "database_url":
        return "database-url"
    if name == "broker_url":
        return "broker-url"
    if name in _IDENTIFIERS:
        return "identifier"
    if name in {"ids", "message_id", "message_ids"}:
        return "message-id" if path.split()[0] in _UUID_COMMANDS else "recorded-id"
    if param.metavar == "ROLE":
        return "role-name"
    if name == "consumer":
        return "consumer-name"
    if name in {"target", "revision"}:
        return name
    return f"text:{name}"


def cases(path: str, command: Any) -> tuple[list[Case], list[str]]:
    """The bad-value runs of one command, and the parameters no generator covers."""
    runs: list[Case] = []
    uncovered: list[str] = []
    for param in command.params:
        kind = kind_of(param, path)
        if kind == "flag":
            continue
        if kind not in BAD_VALUES:
            uncovered.append(f"postroom {path} {param.name} (kind {kind!r})")
            continue
        for value in BAD_VALUES[kind]:
            args = (*path.split(), *_required(path, command, but=param), *_give(param, value))
            runs.append(Case(path, str(param.name), value, args))
    return runs, uncovered


def _give(param: Any, value: str) -> tuple[str, ...]:
    if param.param_type_name == "argument":
        return ("--", value) if value.startswith("-") else (value,)
    return (f"{param.opts[0]}={value}",)


def _required(path: str, command: Any, *, but: Any) -> Iterator[str]:
    """Options and arguments the command needs besides ``but``, with good values."""
    for param in command.params:
        if param is but or not param.required:
            continue
        value = GOOD_VALUES[kind_of(param, path)]
        yield from (value,) if param.param_type_name == "argument" else (param.opts[0], value)


def verdict(case: Case, code: int, stdout: str, stderr: str) -> str | None:
    """What is wrong with how the command ended (None: one sentence or a usage error, exit 2)."""
    said = f"{case}: exit {code}\nstdout: {stdout!r}\nstderr: {stderr!r}"
    if "Traceback" in stdout + stderr:
        return f"a traceback from {said}"
    if code != 2:
        return f"not exit 2 (bad usage) from {said}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    usage_error = "Usage:" in stderr or "─ Error ─" in stderr
    if not usage_error and (len(lines) != 1 or not lines[0].startswith("error: ")):
        return f"not one 'error:' line from {said}"
    # A long value may be shown shortened (with an ellipsis); its start must be there.
    named = case.value[:40] in stderr or case.parameter in stderr
    if not usage_error and not named:
        return f"an error that does not name the bad value from {said}"
    return None
