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
    were not confirmed in it (with the first position not confirmed) once published."""

    number: int
    rows: dict[int, int]
    """Position → partition of the rows whose outcomes are not recorded yet."""
    stalled_keys: dict[str, int] = field(default_factory=dict)
    """Key → position of its first row not confirmed in this batch (failed or held back)."""
    recorded: bool = False


class Batches:
    """Batches from their claim until no claim read before their record can need them.

    Until a batch's outcomes are committed its rows are left out of claims (and their
    partitions kept by the heartbeat), and a claim read before then holds back the rows
    of the keys that failed in it that come after the first failed row of their key.
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

    def stalled_keys(self, numbers: frozenset[int]) -> dict[str, int]:
        """Keys not confirmed in any of the batches ``numbers``, each with the first
        position not confirmed among them."""
        keys: dict[str, int] = {}
        for number in numbers:
            batch = self._batches.get(number)
            if batch is not None:
                for key, position in batch.stalled_keys.items():
                    keys[key] = min(position, keys.get(key, position))
        return keys

    def published(self, number: int, stalled_keys: dict[str, int]) -> None:
        """Batch ``number`` was published: keep the keys not confirmed in it (each with
        its first position not confirmed), and forget
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
