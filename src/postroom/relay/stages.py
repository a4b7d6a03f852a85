"""The relay's latency breakdown: how long each published message waited to be claimed,
and how long from the claim to the broker's confirm (one histogram call per batch)."""

from __future__ import annotations

from collections.abc import Sequence

from postroom.brokers.base import PublishResult
from postroom.metrics import RelayMetrics
from postroom.relay.store import Claim


def observe_stages(
    metrics: RelayMetrics,
    claim: Claim,
    results: Sequence[PublishResult | None],
    confirmed_at: Sequence[float],
) -> None:
    """Record commit→claim and claim→confirm for the confirmed messages of ``claim``.

    A message's due time is its ``available_at`` (its enqueue, or when a delayed message
    became due) on its first attempt, and its ``next_attempt_at`` as claimed on a retry.
    ``confirmed_at`` holds the wall-clock time at which each message's round was answered.
    Both stages use wall-clock time, so clock skew between the enqueuing host and the
    relay's shows in the claim delay (as in the delivery latency).
    """
    claimed = claim.claimed_at
    delays: list[float] = []
    publishes: list[float] = []
    for row, result, answered in zip(claim.rows, results, confirmed_at, strict=True):
        if result is None or not result.confirmed:
            continue
        due = row.due_at if row.attempts else row.message.available_at
        delays.append(claimed - due.timestamp())
        publishes.append(answered - claimed)
    metrics.claim_delay.observe_many(delays)
    metrics.publish_seconds.observe_many(publishes)
