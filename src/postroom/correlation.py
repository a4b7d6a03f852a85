"""Correlation and causation ids: follow-ups enqueued in a handler name what caused them.

While a consumer runs a handler, :func:`handling` makes the consumed message the cause of
every message enqueued in that context: :func:`follow_up_headers` gives them
``postroom-causation-id`` (the consumed message's id) and ``postroom-correlation-id`` (the
consumed message's correlation id, or its id when it has none). Sync handlers run in a
thread with a copy of the context, so they see it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Final

from postroom.message import HEADER_CAUSATION_ID, HEADER_CORRELATION_ID

#: Longest correlation id taken from a consumed message; a longer one is ignored.
MAX_CORRELATION_CHARS: Final = 255

_cause: ContextVar[dict[str, str] | None] = ContextVar("postroom_cause", default=None)


def correlation_of(headers: Mapping[str, str], message_id: str) -> str:
    """The correlation id of a consumed message: its ``postroom-correlation-id`` header if
    it is usable (printable, at most :data:`MAX_CORRELATION_CHARS` characters), else its id.

    The header comes from any producer: a value that is not usable is ignored, never fails
    the message.
    """
    found = headers.get(HEADER_CORRELATION_ID)
    if isinstance(found, str) and 0 < len(found) <= MAX_CORRELATION_CHARS and found.isprintable():
        return found
    return message_id


@contextlib.contextmanager
def handling(headers: Mapping[str, str], message_id: str) -> Iterator[None]:
    """Within the block, messages enqueued get the correlation and causation ids of the
    consumed message with ``headers`` and ``message_id``."""
    token = _cause.set(
        {
            HEADER_CORRELATION_ID: correlation_of(headers, message_id),
            HEADER_CAUSATION_ID: message_id,
        }
    )
    try:
        yield
    finally:
        _cause.reset(token)


def follow_up_headers() -> Mapping[str, str]:
    """The correlation and causation headers for a message enqueued now (empty outside a
    handler)."""
    return _cause.get() or {}
