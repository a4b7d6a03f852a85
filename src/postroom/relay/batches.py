"""The relay's one record of its batches in flight: claimed, published, recorded."""

from __future__ import annotations

from dataclasses import dataclass, field

from postroom.relay.store import Claim

#: Recorded batches kept for the keys they stalled: a claim read before a batch was
#: recorded is published at most this many batches later (three batches overlap).
KEEP_RECORDED = 3


@dataclass(slots=True)
class Batch:
    """One claimed batch: its rows until its outcomes are recorded, and the keys that
    were not confirmed in it once it is published."""

    number: int
    rows: dict[int, int]
    """Position → partition of the rows whose outcomes are not recorded yet."""
    stalled_keys: set[str] = field(default_factory=set)
    recorded: bool = False


class Batches:
    """Batches from their claim until no claim read before their record can need them.

    Until a batch's outcomes are committed its rows are left out of claims (and their
    partitions kept by the heartbeat), and a claim read before then holds back the keys
    that failed in it.
    """

    def __init__(self) -> None:
        self._batches: dict[int, Batch] = {}
        self._last = 0

    def claimed(self, claim: Claim) -> int:
        """Start a batch for ``claim``'s rows; its number."""
        self._last += 1
        rows = {row.position: row.partition for row in claim.rows}
        self._batches[self._last] = Batch(self._last, rows)
        return self._last

    def unrecorded(self) -> frozenset[int]:
        """Numbers of the batches whose outcomes are not committed yet."""
        return frozenset(n for n, b in self._batches.items() if not b.recorded)

    def positions(self) -> list[int]:
        """Positions of the rows whose outcomes are not recorded yet."""
        return [p for b in self._batches.values() for p in b.rows]

    def partitions(self) -> frozenset[int]:
        """Partitions with rows whose outcomes are not recorded yet."""
        return frozenset(p for b in self._batches.values() for p in b.rows.values())

    def stalled_keys(self, numbers: frozenset[int]) -> set[str]:
        """Keys not confirmed in any of the batches ``numbers``."""
        keys: set[str] = set()
        for number in numbers:
            batch = self._batches.get(number)
            if batch is not None:
                keys |= batch.stalled_keys
        return keys

    def published(self, number: int, stalled_keys: set[str]) -> None:
        """Batch ``number`` was published: keep the keys not confirmed in it, and forget
        recorded batches too old for any claim in hand to need."""
        self._batches[number].stalled_keys = stalled_keys
        for old in [
            n for n, b in self._batches.items() if b.recorded and n < number - KEEP_RECORDED
        ]:
            del self._batches[old]

    def recorded(self, number: int) -> None:
        """Batch ``number``'s outcomes are committed (or given up): its rows may be claimed."""
        batch = self._batches.get(number)
        if batch is not None:
            batch.recorded = True
            batch.rows.clear()
