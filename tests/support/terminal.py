"""Running a command on a pseudo-terminal, as an operator at a terminal sees it, and reading
what the terminal was sent.

:func:`run_in_terminal` gives the process a pty as stdin, stdout and stderr (of a chosen
size) and returns everything written to it. :func:`colour_codes` finds the escape sequences
that set a colour, :func:`without_styles` drops those that style text, and
:func:`control_bytes` finds control characters a line of text should not hold.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tests.support.cli import environment

_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_COLOUR_PARAMS = {str(n) for n in (*range(30, 50), *range(90, 98), *range(100, 108))}
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Screen:
    """What a process wrote to its terminal, and how it exited."""

    returncode: int
    output: str


def run_in_terminal(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    columns: int = 120,
    timeout: float = 120,
) -> Screen:
    """Run ``command`` with a pseudo-terminal of ``columns`` columns as its stdin, stdout and
    stderr (``TERM=xterm-256color``); everything it wrote there, once it exited."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(
        list(command),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=environment({"TERM": "xterm-256color", **(env or {})}),
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([master], [], [], max(left, 0))
            if not ready:
                process.kill()
                raise AssertionError(f"{command} did not end within {timeout}s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not data:
                break
            chunks.append(data)
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
    return Screen(returncode, b"".join(chunks).decode(errors="replace"))


def colour_codes(text: str) -> list[str]:
    """The SGR escape sequences in ``text`` that set a foreground or background colour."""
    return [
        match.group()
        for match in _SGR.finditer(text)
        if any(part in _COLOUR_PARAMS for part in match.group(1).split(";"))
    ]


def without_styles(text: str) -> str:
    """``text`` without its SGR escape sequences (colours, bold) and carriage returns."""
    return _SGR.sub("", text).replace("\r", "")


def control_bytes(text: str) -> list[str]:
    """The control characters in ``text`` other than line feeds (C0, DEL, C1)."""
    return _CONTROL.findall(text)
