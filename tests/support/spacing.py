"""Backoff spacing: the gaps between a message's failed attempts, against the nominal plan.

    times = failure_times(relay, message_id)          # from a relay process's JSON log
    gaps = assert_spaced(times, Backoff(0.4, 2.0), slack=0.75)

:class:`postroom.backoff.Backoff` draws the delay after failed attempt ``n`` from the upper
half of ``nominal(n)``, so the gap from attempt ``n`` to attempt ``n + 1`` is at least
``nominal(n) / 2`` whatever the jitter, and at most ``nominal(n)`` plus the time the next
attempt takes to start (a poll interval, a claim, a publish round trip): ``slack``. A zero
backoff, a delay that does not double, or one taken from the wrong attempt lands outside.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime

from postroom.backoff import Backoff
from tests.support.processes import ServiceProcess


def attempt_gaps(times: Sequence[float]) -> list[float]:
    """Seconds between successive attempts (``times`` in the order they happened)."""
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def spacing_problems(times: Sequence[float], backoff: Backoff, *, slack: float) -> list[str]:
    """Each gap outside ``[nominal(n) / 2, nominal(n) + slack]``, described; empty if none."""
    problems = []
    for attempt, gap in enumerate(attempt_gaps(times), start=1):
        nominal = backoff.nominal(attempt)
        low, high = nominal / 2, nominal + slack
        if not low <= gap <= high:
            problems.append(
                f"gap after attempt {attempt} was {gap:.3f} s, outside [{low:.3f}, {high:.3f}] "
                f"(nominal backoff {nominal:g} s)"
            )
    return problems


def assert_spaced(times: Sequence[float], backoff: Backoff, *, slack: float) -> list[float]:
    """Fail unless every gap between ``times`` keeps to ``backoff``; return the gaps."""
    problems = spacing_problems(times, backoff, slack=slack)
    gaps = [round(gap, 3) for gap in attempt_gaps(times)]
    assert not problems, f"attempts not spaced by the backoff (gaps {gaps}): " + "; ".join(problems)
    return gaps


def failure_times(relay: ServiceProcess, message_id: str) -> list[float]:
    """When a relay process logged each failed attempt of ``message_id`` (epoch seconds, in
    attempt order), from its ``relay.publish_failed`` events; fails if an attempt number is
    missing or repeated."""
    events = [e for e in relay.events("relay.publish_failed") if e.get("message_id") == message_id]
    numbers = [int(e["attempt"]) for e in events]
    assert numbers == list(range(1, len(events) + 1)), (
        f"failed attempts of {message_id} logged out of order or twice: {numbers}\n{relay.tail()}"
    )
    return [datetime.fromisoformat(e["timestamp"]).timestamp() for e in events]
