"""Partition leases: each partition of the outbox has one relay at a time.

Every relay heartbeats on its own connection. A heartbeat renews the partitions it owns,
counts the live relays, and moves toward a fair share: it takes free or expired
partitions when it has too few, and drains then gives up partitions when it has too many.
Each acquisition of a partition mints a new token; every mark of a row must present the
token of its partition's lease as it was when the row was read, so a relay that stalled
past its lease cannot record anything for rows another relay has taken over (fencing).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable

from postroom.relay.store import Connection
from postroom.schema import relay_sql
from postroom.schema.tables import PARTITION_COUNT, Tables


def fair_share(relay_id: str, live_ids: list[str]) -> int:
    """How many partitions ``relay_id`` should hold among ``live_ids`` (sorted).

    Every relay gets the same number, and the first ``PARTITION_COUNT % len(live_ids)``
    relays by id one more, so the shares always add up to every partition.
    """
    if relay_id not in live_ids:
        return 0
    base, extra = divmod(PARTITION_COUNT, len(live_ids))
    return base + (1 if live_ids.index(relay_id) < extra else 0)


class PartitionLeases:
    """This relay's share of the partitions, and how long its leases last."""

    def __init__(
        self, connection: Connection, tables: Tables, relay_id: str, lease_seconds: float
    ) -> None:
        self._connection = connection
        self._tables = tables
        self.relay_id = relay_id
        self.lease_seconds = lease_seconds
        self.tokens: dict[int, uuid.UUID] = {}
        """Partition → the token of this relay's current lease on it."""
        self.draining: set[int] = set()
        """Owned partitions being given up: no new batches are read from them."""
        self.last_renewed = 0.0
        """Monotonic time of the last successful heartbeat."""
        self._deadline = 0.0
        self.live_relays = 0
        self.broker_state: Callable[[], tuple[str, str | None]] = lambda: ("connecting", None)
        """The relay's broker state and its error, recorded with each heartbeat."""

    def seconds_left(self) -> float:
        """Seconds until the current leases run out (by this process's monotonic clock)."""
        return self._deadline - time.monotonic()

    async def heartbeat(self, busy: Callable[[], frozenset[int]] = frozenset) -> None:
        """Renew, then move toward this relay's fair share of the partitions.

        Giving partitions up takes two heartbeats: surplus partitions are first set to
        *draining* (claims stop reading them), then released once ``busy()`` — asked at
        that moment — says nothing of theirs is in flight. So a relay rebalances under
        a steady backlog, and never releases a partition under a batch being published.
        """
        started = time.monotonic()
        params = {"relay": self.relay_id, "lease": self.lease_seconds}
        async with self._connection.transaction() as connection:
            state, error = self.broker_state()
            await connection.execute(
                relay_sql.register_relay_sql(self._tables),
                {
                    "relay": self.relay_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "broker_state": state,
                    "broker_error": error,
                },
            )
            cursor = await connection.execute(relay_sql.live_relays_sql(self._tables), params)
            live_ids = [row[0] for row in await cursor.fetchall()]
            cursor = await connection.execute(relay_sql.renew_partitions_sql(self._tables), params)
            leases = await cursor.fetchall()
            owned = {row[0] for row in leases}
            self.draining &= owned
            share = fair_share(self.relay_id, live_ids)
            keep = sorted(owned - self.draining)
            if len(keep) > share:
                self.draining |= set(keep[share:])
            elif len(keep) < share and self.draining:
                self.draining -= set(sorted(self.draining)[: share - len(keep)])
            elif len(owned) < share:
                cursor = await connection.execute(
                    relay_sql.acquire_partitions_sql(self._tables),
                    {**params, "want": share - len(owned)},
                )
                leases.extend(await cursor.fetchall())
            releasable = self.draining - busy()
            if releasable:
                # No await between asking busy() and dropping the tokens: no batch can
                # start on these partitions in between.
                self.tokens = {p: t for p, t in self.tokens.items() if p not in releasable}
                await self._release(releasable)
                self.draining -= releasable
                leases = [row for row in leases if row[0] not in releasable]
        self.tokens = {row[0]: row[1] for row in leases}
        if leases:
            lease_until, db_now = leases[0][2], leases[0][3]
            self._deadline = started + (lease_until - db_now).total_seconds()
        self.live_relays = len(live_ids)
        self.last_renewed = time.monotonic()

    def claimable(self) -> dict[int, uuid.UUID]:
        """Tokens of the partitions to read new batches from (owned, not draining)."""
        return {p: t for p, t in self.tokens.items() if p not in self.draining}

    @property
    def owned(self) -> frozenset[int]:
        """The partitions this relay holds."""
        return frozenset(self.tokens)

    async def release_all(self) -> None:
        """Give up every partition and leave the live set (clean shutdown)."""
        async with self._connection.transaction() as connection:
            await self._release(self.owned)
            await connection.execute(
                relay_sql.unregister_relay_sql(self._tables), {"relay": self.relay_id}
            )
        self.tokens = {}
        self.draining = set()
        self._deadline = 0.0

    async def _release(self, partitions: Iterable[int]) -> None:
        await self._connection.fetch(
            relay_sql.release_partitions_sql(self._tables),
            {"relay": self.relay_id, "partitions": sorted(partitions)},
        )
