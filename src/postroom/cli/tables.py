"""Tables that stay readable at any width: in a terminal, at 80 columns, and piped.

A :class:`FittedTable` decides its layout when it is printed, from the width it is given
(the console's, see :func:`postroom.cli.text.screen_width`):

1. every column at its natural width, when they all fit;
2. otherwise the *free-text* columns (keys, errors, topics, payload previews) are
   shortened with an ellipsis — ids, states and counts always stay whole — first to no
   less than :data:`FREE_COMFORTABLE_WIDTH` each, leaving out the *optional* columns
   (facts also shown elsewhere, such as a row's age) one by one if that helps, then to no
   less than :data:`FREE_MIN_WIDTH` (never below their header) the same way;
3. when even that does not fit, one ``field: value`` block per row (a vertical record
   layout), where whole values are never cut.

Columns are two spaces apart, without borders, and lines end without trailing spaces, so
piped output reads well in logs and splits on runs of spaces.

Cells are plain text: control characters are shown as escapes and no rich markup is read
from them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from postroom.cli.text import printable

#: A free-text column is never made narrower than this (or its header, or its content).
FREE_MIN_WIDTH = 12
#: Optional columns are left out before a free-text column gets narrower than this.
FREE_COMFORTABLE_WIDTH = 24
#: Spaces between two columns.
GAP = 2


def cell(value: Any) -> str:
    """A value as one line of table text: '-' for nothing, timestamps in UTC to the second,
    control characters (newlines too) as escapes."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return timestamp(value)
    return printable(str(value))


def timestamp(value: datetime | None) -> str:
    """``2024-05-01 10:00:00Z`` (UTC), or '-'."""
    if value is None:
        return "-"
    return value.astimezone(tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def shorten(text: str, width: int) -> Text:
    """``text`` in at most ``width`` cells, its end replaced by '…' when it is longer."""
    result = Text(text)
    if cell_len(text) > width:
        result.truncate(width, overflow="ellipsis")
    return result


class FittedTable:
    """A table of ``rows`` under ``headers`` that fits the width it is printed in (see the
    module's docstring); the columns named in ``free`` may be shortened, those named in
    ``optional`` left out (in that order)."""

    def __init__(
        self,
        title: str | None,
        headers: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        free: Collection[str] = (),
        optional: Sequence[str] = (),
    ) -> None:
        self.title = None if title is None else printable(title)
        self.headers = list(headers)
        self.rows = [[cell(value) for value in row] for row in rows]
        self.free = [header in free for header in self.headers]
        self.optional = [self.headers.index(header) for header in optional]

    def layout(self, width: int) -> tuple[list[int], list[int]] | None:
        """The columns shown (their indexes) and their widths in ``width`` cells, or None
        when only the vertical layout fits."""
        for least in (FREE_COMFORTABLE_WIDTH, FREE_MIN_WIDTH):
            shown = list(range(len(self.headers)))
            for left_out in [None, *self.optional]:
                if left_out is not None:
                    shown.remove(left_out)
                widths = self.widths(width, shown, least)
                if widths is not None:
                    return shown, widths
        return None

    def widths(self, width: int, shown: Sequence[int], least_free: int) -> list[int] | None:
        """The widths of the ``shown`` columns in ``width`` cells, free-text ones no
        narrower than ``least_free`` (or their header, or their content), or None when they
        do not fit."""
        natural = [
            max([cell_len(self.headers[i])] + [cell_len(row[i]) for row in self.rows])
            for i in shown
        ]
        room = width - GAP * (len(natural) - 1)
        if sum(natural) <= room:
            return natural
        least = [
            min(n, max(cell_len(self.headers[i]), least_free)) if self.free[i] else n
            for n, i in zip(natural, shown, strict=True)
        ]
        spare = room - sum(least)
        if spare < 0:
            return None
        result = list(least)
        growing = [i for i, n in enumerate(natural) if result[i] < n]
        while spare > 0 and growing:
            share = max(1, spare // len(growing))
            for i in growing:
                step = min(share, natural[i] - result[i], spare)
                result[i] += step
                spare -= step
            growing = [i for i in growing if result[i] < natural[i]]
        return result

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Render as a table fitted to ``options.max_width``, or as one block per row."""
        if self.title is not None:
            yield Text(self.title, style="table.title")
        layout = self.layout(options.max_width)
        if layout is None:
            yield from self._records(options.max_width)
            return
        shown, widths = layout
        yield self._line([self.headers[i] for i in shown], widths, style="bold")
        for row in self.rows:
            yield self._line([row[i] for i in shown], widths)

    def _line(self, texts: Sequence[str], widths: Sequence[int], style: str = "") -> Text:
        """One line of the table: each text in its column, without trailing spaces."""
        line = Text()
        for i, (text, size) in enumerate(zip(texts, widths, strict=True)):
            if i:
                line.append(" " * GAP)
            part = shorten(text, size)
            part.stylize(style)
            part.pad_right(size - part.cell_len)
            line.append_text(part)
        line.rstrip()
        return line

    def _records(self, width: int) -> RenderResult:
        label_width = max(cell_len(header) for header in self.headers) + 2
        room = max(width - label_width, FREE_MIN_WIDTH)
        for number, row in enumerate(self.rows):
            if number:
                yield Text("")
            for header, text, free in zip(self.headers, row, self.free, strict=True):
                value = shorten(text, room) if free else Text(text)
                yield Text.assemble((f"{header}:".ljust(label_width), "bold"), value)
