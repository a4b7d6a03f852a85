"""The options the operator commands share, declared once.

Each family (outbox, inbox) gets the same option under its own ``POSTROOM_<FAMILY>_*``
environment variable; the database options come from :func:`postroom.cli.common.with_settings`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer


def _option(*flags: str, envvar: str, help: str, metavar: str | None = None) -> Any:
    return typer.Option(*flags, envvar=envvar, metavar=metavar, help=help, show_default=False)


def since(flag: str, envvar: str, help: str) -> Any:
    """A duration option (``--older-than``, ``--newer-than``): ``30s``, ``5m``, ``24h``, ``7d``."""
    return _option(flag, envvar=envvar, metavar="DURATION", help=f"{help}: 30s, 5m, 24h, 7d.")


def states(envvar: str, help: str) -> Any:
    """``--state``/``-s``: which states a command looks at (repeat for several)."""
    return _option("--state", "-s", envvar=envvar, help=help)


def everything(envvar: str, help: str) -> Any:
    """``--all``: act on everything the command applies to, without ids or filters."""
    return typer.Option("--all", envvar=envvar, help=help)


#: The most rows a listing shows (``--limit``).
MAX_LIMIT = 1_000_000


def limit(envvar: str) -> Any:
    """``--limit``/``-n``: how many rows a listing shows (1 to :data:`MAX_LIMIT`)."""
    return typer.Option(
        "--limit", "-n", envvar=envvar, min=1, max=MAX_LIMIT, help="Show at most this many."
    )


def newest(envvar: str, help: str) -> Any:
    """``--newest/--oldest``: the order of a listing."""
    return typer.Option("--newest/--oldest", envvar=envvar, help=help)


Json = Annotated[
    bool,
    typer.Option(
        "--json",
        envvar="POSTROOM_JSON",
        help="Print one JSON document (for scripts) instead of tables.",
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        envvar="POSTROOM_DRY_RUN",
        help="Show what would change and change nothing.",
    ),
]
Yes = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        envvar="POSTROOM_YES",
        help="Change without asking (needed when not run from a terminal).",
    ),
]

OutboxOlderThan = Annotated[
    str | None,
    since("--older-than", "POSTROOM_OUTBOX_OLDER_THAN", "Only rows written longer ago than this"),
]
OutboxNewerThan = Annotated[
    str | None,
    since("--newer-than", "POSTROOM_OUTBOX_NEWER_THAN", "Only rows written within this long"),
]
OutboxAll = Annotated[
    bool,
    everything(
        "POSTROOM_OUTBOX_ALL", "Without ids or filters: act on every row this command applies to."
    ),
]
OutboxLimit = Annotated[int, limit("POSTROOM_OUTBOX_LIMIT")]

InboxOlderThan = Annotated[
    str | None,
    since(
        "--older-than", "POSTROOM_INBOX_OLDER_THAN", "Only entries processed longer ago than this"
    ),
]
InboxNewerThan = Annotated[
    str | None,
    since("--newer-than", "POSTROOM_INBOX_NEWER_THAN", "Only entries processed within this long"),
]
InboxAll = Annotated[
    bool,
    everything(
        "POSTROOM_INBOX_ALL", "Without ids or a time filter: forget every entry of the consumer."
    ),
]
InboxLimit = Annotated[int, limit("POSTROOM_INBOX_LIMIT")]
