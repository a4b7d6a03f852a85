"""The CLI's one error boundary, and help that reads like the options it describes.

Every command runs inside :class:`PostroomGroup`, the root command's class: an expected
failure (a :class:`~postroom.errors.PostroomError`) becomes one ``error:`` line on stderr
and the error's exit code; anything else becomes one ``error: unexpected ...`` line and
exit 3. Tracebacks are printed only under ``--debug`` (or ``POSTROOM_DEBUG=1``). Click's
own usage errors keep their usage block and exit 2.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

from postroom.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    debug_mode,
    error_console,
    say_error,
)
from postroom.errors import PostroomError
from postroom.urls import redact_text

#: What the exit codes mean, for ``postroom --help``, the README and docs/operations.md.
EXIT_CODES = (
    "Exit codes: 0 success; 1 refused or aborted (nothing changed), or a check failed "
    "(`db check`); 2 bad usage (an option, argument or setting postroom cannot use, or a "
    "missing POSTROOM_DATABASE_URL); 3 cannot reach or not found (database or broker "
    "unreachable, tables, module or message not found, the operation failed, or an "
    "unexpected error); 130 interrupted."
)

#: Readable names of the value an option takes, by the Python type typer gave it.
_METAVARS: Mapping[str, str] = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER"}


class PostroomGroup(TyperGroup):
    """The root ``postroom`` command: the error boundary of every command under it."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        """Before parsing (and any ``--help``), give every option a readable metavar."""
        for command in walk(self):
            help_option = command.get_help_option(typer.Context(command))
            for param in [*command.params, help_option]:
                readable_metavar(param)
        return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; turn whatever it raises into one line and an exit code."""
        debugging = bool(ctx.params.get("debug"))
        token = debug_mode.set(debugging)
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise  # click's own: exit codes, "Aborted!", usage errors, a reader gone (exit 1)
        except KeyboardInterrupt:
            error_console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except PostroomError as exc:
            raise typer.Exit(report(exc, str(exc), exc.exit_code, debugging)) from None
        except Exception as exc:
            raise typer.Exit(unexpected(exc, debugging)) from None
        finally:
            debug_mode.reset(token)


def unexpected(exc: BaseException, debugging: bool) -> int:
    """Report an error postroom did not raise on purpose (exit 3); the exit code."""
    message = f"unexpected {type(exc).__name__}: {redact_text(str(exc)) or 'no message'}"
    if not debugging:
        message += " (run with --debug for the traceback)"
    return report(exc, message, EXIT_FAILED, debugging)


def report(exc: BaseException, message: str, code: int, debugging: bool) -> int:
    """Print ``message`` as one error line (after the traceback when ``debugging``); ``code``."""
    if debugging:
        traceback.print_exception(exc, file=sys.stderr)
    say_error(message)
    return code


def walk(command: Any) -> Iterator[Any]:
    """``command`` and every command below it (click commands and groups)."""
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from walk(sub)


def readable_metavar(param: Any) -> None:
    """Show what ``param`` takes as TEXT, INTEGER, its choices or its own metavar, and a flag
    as nothing (instead of ``<str>``, ``<int>``, ``<list[a|b]>``, ``<bool>``)."""
    if isinstance(param, TyperOption) and param.metavar is None:
        descriptor = param.type_descriptor
        if param.is_flag:
            param.metavar = ""
        elif descriptor.is_choice:
            choices = [str(getattr(c, "value", c)) for c in descriptor.choices or ()]
            param.metavar = f"[{'|'.join(choices)}]"
        else:
            bare = param.bare_type().removeprefix("list[").removesuffix("]")
            param.metavar = _METAVARS.get(bare, bare.upper())
    elif isinstance(param, TyperArgument) and not isinstance(param, _NamedArgument):
        if param.metavar is None:
            param.metavar = (param.name or "value").upper()
        param.__class__ = _NamedArgument


class _NamedArgument(TyperArgument):
    """An argument whose help row shows its name (``REVISION``) and no ``<str>`` type."""

    def display_type_rich(self, ctx: Any) -> str | None:
        """No type column: the argument's name and help say what it takes."""
        return None
