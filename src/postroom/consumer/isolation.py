"""Handler runs side by side, except a suspect's: a redelivered message runs alone.

A message the broker hands out again may be the one whose handler killed the last process.
While it runs beside others, a crash cannot be pinned on it, and every message in hand at
the time would be counted as a suspect too. So a redelivered message waits until no other
handler runs, and no handler starts until it is done: a crash during its run is its own.
Redeliveries follow a crash or a restart only, so the lost parallelism is brief.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class HandlerGate:
    """Ordinary runs share the gate; a suspect's run has it alone (suspects go first)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Run beside other ordinary runs, never beside a suspect's."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            async with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        """Run with no other handler running."""
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and not self._sharing)
            finally:
                self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()
