"""Waiting for a condition: the one poll loop of the test suite (and the benchmarks).

    await wait_until(lambda: len(handled) == 3, within=30, what="three handled")
    wait_until_sync(mark.exists, within=30, what="the handler's write", watch=relay.check_alive)

``check`` may be a plain function or return an awaitable (async form only); a wait returns
its first truthy result (an event found, a row read). Options (:class:`Options`): ``within``
seconds (30), ``what`` is waited for (named on failure), ``interval`` between looks (0.05 s),
``watch`` is called on every look and may raise to give up early (a process that exited, a
reader that failed), ``detail()`` is appended to the failure, and ``error`` is what a
timeout raises (AssertionError: the test fails).

The opposite, that something does NOT happen for a while (no further attempt after a dead
letter), can only be shown by watching for a set time: :func:`stays_false` looks for
``during`` seconds, which the test computes from its settings, and fails at the first look
where ``check`` is truthy.

    await stays_false(lambda: len(attempts) > 4, during=backoff.nominal(4) + 0.5, what="...")
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict, TypeVar, Unpack, overload

T = TypeVar("T")


class Options(TypedDict, total=False):
    """How long and how to wait (see the module's docstring)."""

    within: float
    what: str
    interval: float
    watch: Callable[[], None] | None
    detail: Callable[[], str] | None
    error: type[Exception]


class _Deadline:
    def __init__(
        self,
        within: float = 30.0,
        what: str = "",
        interval: float = 0.05,
        watch: Callable[[], None] | None = None,
        detail: Callable[[], str] | None = None,
        error: type[Exception] = AssertionError,
    ) -> None:
        self.end = time.monotonic() + within
        self.within = within
        self.what = what
        self.interval = interval
        self.watch = watch
        self.detail = detail
        self.error = error

    def look(self) -> None:
        """Raise if the wait should end unsuccessfully: ``watch`` objects, or time is up."""
        if self.watch is not None:
            self.watch()
        if time.monotonic() > self.end:
            message = f"{self.what or 'the condition'} did not happen within {self.within:g} s"
            if self.detail is not None:
                message += "\n" + self.detail()
            raise self.error(message)


@overload
async def wait_until(check: Callable[[], Awaitable[T | None]], **options: Unpack[Options]) -> T: ...
@overload
async def wait_until(check: Callable[[], T | None], **options: Unpack[Options]) -> T: ...
async def wait_until(check: Callable[[], Any], **options: Unpack[Options]) -> Any:
    """Poll ``check`` (sleeping on the event loop) until it is truthy; fail after ``within``."""
    deadline = _Deadline(**options)
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        deadline.look()
        await asyncio.sleep(deadline.interval)


def wait_until_sync(check: Callable[[], T | None], **options: Unpack[Options]) -> T:
    """:func:`wait_until` for sync code (blocks the thread between looks)."""
    deadline = _Deadline(**options)
    while not (result := check()):
        deadline.look()
        time.sleep(deadline.interval)
    return result


async def stays_false(
    check: Callable[[], Any], *, during: float, what: str, interval: float = 0.05
) -> None:
    """Look at ``check`` for ``during`` seconds; fail (AssertionError naming ``what``) at the
    first look where it is truthy. The last look is made after ``during`` has passed."""
    end = time.monotonic() + during
    while True:
        last = time.monotonic() >= end
        if check():
            raise AssertionError(f"{what} happened (watched for {during:g} s)")
        if last:
            return
        await asyncio.sleep(min(interval, max(0.0, end - time.monotonic())))
