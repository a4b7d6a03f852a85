"""Text as a terminal shows it: control characters made visible, and the width to fit.

Everything the CLI prints for people comes from the outside at some point (keys, headers,
errors, topics, payloads). A control character in it would act on the operator's terminal
(``\\x1b[2J`` clears the screen, ``\\r`` overwrites the line), so :func:`printable` shows
each one as an escape instead. Rich markup is never read from such text: callers print it
as :class:`rich.text.Text` or with ``markup=False``.
"""

from __future__ import annotations

import re
import shutil

#: C0 control characters, DEL and C1 control characters.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: The width used when the output is not a terminal and COLUMNS is not set.
DEFAULT_WIDTH = 80


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every control character (but those in ``keep``) shown as an escape:
    ``\\n``, ``\\r``, ``\\t``, or ``\\xNN`` (``\\x1b`` for escape, ``\\x7f`` for DEL)."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        return _NAMED.get(char) or f"\\x{ord(char):02x}"

    return _CONTROL.sub(escape, text)


def screen_width() -> int:
    """The width to fit output to: COLUMNS if set, else the terminal's, else 80 (piped)."""
    columns = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return columns if columns > 0 else DEFAULT_WIDTH
