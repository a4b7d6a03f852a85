"""The fault suite's profiles and seed: how much each scenario breaks, and its random choices.

``POSTROOM_FAULTS=short`` (the default, for CI) or ``full`` (``make faults``) picks the
counts; ``POSTROOM_FAULTS_SEED`` (random when unset) seeds every run's choices.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """How many faults each scenario injects, and how long a run may take to drain."""

    name: str
    relay_kills: int
    pauses: int
    broker_outages: int
    database_faults: int
    consumer_kills: int
    storms: int
    storm_copies: int
    """Copies of each stormed message, on its own topic and again on a twin topic."""
    long_transactions: int
    database_crashes: int
    """PostgreSQL crashes (SIGKILL or an immediate stop) of a private server, then restarts."""
    drain: float
    """Seconds the drain (once the writer stops) may go without progress before the run
    fails: no more rows published, seen on the wire or handled."""
    timeout: float
    """pytest-timeout per scenario run."""
    one_broker: bool = False
    """Run each scenario on one broker, chosen by the seed (the database crash on both);
    ``POSTROOM_FAULTS_BROKERS=both`` runs every scenario on both."""


PROFILES = {
    "short": Profile(
        "short",
        relay_kills=3,
        pauses=1,
        broker_outages=3,
        database_faults=4,
        consumer_kills=3,
        storms=2,
        storm_copies=5,
        long_transactions=2,
        database_crashes=2,
        drain=45,
        timeout=150,
        one_broker=True,
    ),
    "full": Profile(
        "full",
        relay_kills=50,
        pauses=10,
        broker_outages=21,
        database_faults=30,
        consumer_kills=50,
        storms=20,
        storm_copies=20,
        long_transactions=20,
        database_crashes=20,
        drain=120,
        timeout=1800,
    ),
}


def profile_from_env() -> Profile:
    """The profile named by ``POSTROOM_FAULTS`` (default ``short``)."""
    name = os.environ.get("POSTROOM_FAULTS", "short").strip().lower() or "short"
    if name not in PROFILES:
        raise ValueError(
            f"POSTROOM_FAULTS={name!r} is not a fault profile; use one of {', '.join(PROFILES)}"
        )
    return PROFILES[name]


def seed_from_env() -> int:
    """``POSTROOM_FAULTS_SEED`` if set (an integer), else a fresh random seed."""
    given = os.environ.get("POSTROOM_FAULTS_SEED", "").strip()
    if not given:
        return random.SystemRandom().randrange(2**31)
    try:
        return int(given)
    except ValueError:
        raise ValueError(f"POSTROOM_FAULTS_SEED={given!r} is not an integer") from None


def one_broker_from_env(profile: Profile) -> bool:
    """Whether this run takes one broker per scenario: the profile's choice, unless
    ``POSTROOM_FAULTS_BROKERS=both``."""
    given = os.environ.get("POSTROOM_FAULTS_BROKERS", "").strip().lower()
    if given not in {"", "both", "one"}:
        raise ValueError(f"POSTROOM_FAULTS_BROKERS={given!r} is not one of: both, one")
    return profile.one_broker if not given else given == "one"


#: Scenarios that run on both brokers even when the profile takes one broker per scenario.
BOTH_BROKERS_ALWAYS = frozenset({"test_database_crashed_and_restarted"})


def broker_for(scenario: str, seed: int, brokers: list[str]) -> str:
    """The broker ``scenario`` runs on when one is taken: drawn from the seed, so a replay
    with the same seed runs the same ones."""
    return random.Random(f"{seed}:{scenario}").choice(brokers)


PROFILE = profile_from_env()
SEED = seed_from_env()
ONE_BROKER = one_broker_from_env(PROFILE)
