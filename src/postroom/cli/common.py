"""Options and error handling shared by every command."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import os
import re
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from postroom.cli.text import printable, screen_width
from postroom.config import Settings, env_var, field_type, format_duration, parse_duration
from postroom.errors import EXIT_FAILED as EXIT_FAILED
from postroom.errors import EXIT_USAGE as EXIT_USAGE
from postroom.errors import PostroomError
from postroom.log import configure_logging
from postroom.urls import ALLOW_INSECURE_TLS_ENV

#: Exit codes: 0 success, 1 refused, aborted or a check failed, 2 bad usage,
#: 3 cannot reach or not found (the operation failed), 130 interrupted.
EXIT_CHECK_FAILED = 1
EXIT_REFUSED = 1
EXIT_INTERRUPTED = 130

#: Whether this run was started with ``--debug`` (or POSTROOM_DEBUG): errors keep their traceback.
debug_mode: contextvars.ContextVar[bool] = contextvars.ContextVar("debug_mode", default=False)

# Fitted to COLUMNS, the terminal, or 80 columns when piped (see cli.text.screen_width).
console = Console(soft_wrap=True, width=screen_width())
error_console = Console(stderr=True, soft_wrap=True, width=screen_width())

_defaults = Settings()


def _option(name: str, flag: str, metavar: str | None = None) -> Any:
    return typer.Option(
        flag, envvar=env_var(name), metavar=metavar, help=markdown_text(_defaults.help_for(name))
    )


def markdown_text(text: str) -> str:
    """``text`` with what markdown would eat escaped (``header:<name>`` stays as written)."""
    return text.replace("<", "\\<").replace(">", "\\>")


_COMMON_FIELDS = ("database_url", "schema", "outbox_table", "inbox_table")
_FIELD_TYPES: dict[str, type] = {f.name: field_type(f.name) for f in dataclasses.fields(Settings)}


def _parameter(name: str) -> inspect.Parameter:
    """A keyword parameter whose typer option sets Settings field ``name``."""
    kind = _FIELD_TYPES[name]
    flag = _flag(name)
    default: Any = getattr(_defaults, name)
    annotation: Any = kind
    metavar = None
    if kind is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    elif kind is float:
        annotation, default, metavar = str, format_duration(default), "DURATION"
    elif name.endswith("_url"):
        metavar = "URL"
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, _option(name, flag, metavar)],
    )


def _flag(name: str) -> str:
    """The command-line flag of Settings field ``name``."""
    return "--" + name.removeprefix("relay_").replace("_", "-")


R = TypeVar("R")


def with_settings(
    *fields: str, database: bool = True
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command options for the common database settings (unless not ``database``)
    plus ``fields``.

    The command receives one :class:`Settings` as ``settings``; each option has its
    ``POSTROOM_*`` environment variable, shown in ``--help``.
    """
    names = (_COMMON_FIELDS if database else ()) + fields
    extra = [_parameter(name) for name in names]

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            values = {name: kwargs.pop(name) for name in names}
            with user_errors():
                for name in names:
                    if _FIELD_TYPES[name] is float:
                        values[name] = parse_duration(values[name], what=_flag(name))
                settings = Settings.from_env({}, **values)
            return command(*args, settings=settings, **kwargs)

        return replace_parameter(command, "settings", extra, wrapper)

    return decorate


def replace_parameter(
    command: Callable[..., R],
    name: str,
    options: list[inspect.Parameter],
    wrapper: Callable[..., R],
) -> Callable[..., R]:
    """Give ``wrapper`` (which calls ``command``) the command's parameters, without ``name``
    and with ``options`` at the end: what typer reads to build the command's options."""
    hints = typing.get_type_hints(command, include_extras=True)
    signature = inspect.signature(command)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name != name
    ]
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=own + options
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in own + options}
    return wrapper


def configure_service_logging(settings: Settings) -> None:
    """structlog set-up for a long-running command (relay, consume) from its settings."""
    use_json = None if settings.log_format == "auto" else settings.log_format == "json"
    configure_logging(json=use_json)


def allow_insecure_tls(settings: Settings) -> None:
    """Pass ``--allow-insecure-tls`` on to the broker modules, which read it from this
    process's environment (POSTROOM_ALLOW_INSECURE_TLS), as library users set it."""
    if settings.allow_insecure_tls:
        os.environ[ALLOW_INSECURE_TLS_ENV] = "true"


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``message`` as one ``error:`` line on stderr and exit with ``code``.

    The message is printed as written (never read as rich markup), on one line.
    """
    say_error(message)
    raise typer.Exit(code)


def say_error(message: str) -> None:
    """Print ``message`` as one ``error:`` line on stderr."""
    line = re.sub(r"\s*\n\s*", " ", message.strip()) or "failed without saying why"
    sentence = Text.assemble(("error:", "bold red"), " ", printable(line))
    error_console.print(sentence, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print postroom errors as sentences instead of tracebacks, with each error's exit code.

    Under ``--debug`` the error goes on to the CLI's error boundary, which prints its
    traceback too.
    """
    try:
        yield
    except PostroomError as exc:
        if debug_mode.get():
            raise
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        error_console.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
