"""A progress bar on stderr for the commands that walk many rows or messages.

Shown only when stderr is a terminal: piped or redirected, the command writes no bar and
no partial line, so logs and scripts see only its sentences (or its ``--json``). The bar
honours ``NO_COLOR`` (through rich) and stays on the screen, with its final count, when the
work ends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from postroom.cli.common import error_console
from postroom.cli.text import printable

#: Called with how many more rows or messages are done.
Advance = Callable[[int], None]


def _nothing(count: int) -> None:
    """Advance nothing: there is no bar to move."""


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Advance]:
    """A bar named ``description`` on stderr, up to ``total`` (None: not known, the bar
    pulses until the work ends); yields the function that moves it on.

    Without a terminal on stderr nothing is printed and the function does nothing.
    """
    if not sys.stderr.isatty():
        yield _nothing
        return
    columns: list[ProgressColumn | str] = [
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=error_console) as bar:
        task = bar.add_task(printable(description), total=total)
        yield lambda count: bar.advance(task, count)
        if total is None:
            bar.update(task, total=bar.tasks[0].completed)
