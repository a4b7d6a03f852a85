"""Capped exponential backoff with jitter, for failed messages and lost connections."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays that double per attempt from ``initial`` up to ``maximum``, with jitter.

    The jitter draws each delay from the upper half of the nominal one, so retries of
    many rows that failed together spread out, yet never retry sooner than half the plan.
    """

    initial: float = 1.0
    maximum: float = 300.0

    def nominal(self, attempt: int) -> float:
        """The planned wait after failed attempt ``attempt`` (1 for the first), before jitter."""
        # The exponent is clamped: past ~60 doublings every delay is the maximum anyway,
        # and 2.0 ** 1024 would overflow after a long outage.
        return min(self.maximum, self.initial * 2.0 ** min(max(0, attempt - 1), 60))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first)."""
        return self.nominal(attempt) * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not security
