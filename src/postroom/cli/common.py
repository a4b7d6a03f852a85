"""Options and error handling shared by every command."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console

from postroom.config import Settings, env_var
from postroom.errors import PostroomError

#: Exit codes: 0 success, 1 a check failed, 2 bad usage, 3 the operation failed.
EXIT_CHECK_FAILED = 1
EXIT_FAILED = 3

console = Console(soft_wrap=True)
error_console = Console(stderr=True, soft_wrap=True)

_defaults = Settings()


def _option(name: str, flag: str) -> Any:
    return typer.Option(flag, envvar=env_var(name), help=_defaults.help_for(name))


_COMMON_FIELDS = ("database_url", "schema", "outbox_table", "inbox_table")
_COMMON_PARAMETERS = [
    inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=getattr(_defaults, name),
        annotation=Annotated[str, _option(name, "--" + name.replace("_", "-"))],
    )
    for name in _COMMON_FIELDS
]

P = ParamSpec("P")
R = TypeVar("R")


def with_settings(command: Callable[..., R]) -> Callable[..., R]:
    """Give a command the common database options; it receives them as ``settings``.

    The command's own parameters stay as they are; the wrapper adds ``--database-url``,
    ``--schema``, ``--outbox-table`` and ``--inbox-table`` (each with its environment
    variable) and builds one :class:`Settings` from them.
    """
    hints = typing.get_type_hints(command, include_extras=True)
    signature = inspect.signature(command)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name != "settings"
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        common = {name: kwargs.pop(name) for name in _COMMON_FIELDS}
        with user_errors():
            settings = Settings.from_env({}, **common)
        return command(*args, settings=settings, **kwargs)

    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=own + _COMMON_PARAMETERS
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in own + _COMMON_PARAMETERS}
    return wrapper


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``message`` as an error sentence and exit."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print postroom errors as sentences instead of tracebacks."""
    try:
        yield
    except PostroomError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)
