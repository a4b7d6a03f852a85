"""The fault suite's verdict: a run's recorded history in, every broken promise out.

A :class:`History` is what one run recorded once it settled: the messages the writer
committed (each key's numbers in commit order), the late commits of the long-transaction
scenario, the messages of transactions that rolled back, the outbox's rows, every delivery
the read-back received (in arrival order), the effect rows the consumer's handler wrote
(numbered in the order they were applied) and how often each of the scenario's faults
happened. :func:`judge` compares them and returns a :class:`Verdict`; the real runs and the
checker's self-test (``test_checks.py``, which tampers with a recorded history) both go
through it, so a check the self-test proves is the check every scenario runs.

Order scope: the relay promises each key's order on the wire (``docs/relay.md``). On
RabbitMQ one queue receives a key's messages in publish order whatever their routing
key, so the scope is the key; on Kafka order holds within a partition, so the scope is
(topic, key), and each key of a topic must stay on one partition. The consumer promises
order only on Kafka (each partition handled in order, partitions in parallel); RabbitMQ
deliveries are handled concurrently, so effect order is checked on Kafka only: per
partition, effects applied in the order of their first offsets.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from postroom.message import Message
from tests.support.readback import Delivered, check_deliveries


@dataclass(frozen=True)
class LateCommit:
    """A row whose transaction stayed open while later rows of its key were published.

    The promise (``docs/relay.md``, "Ordering rules"): per key, rows are published in
    position order among the rows committed so far. So a row of its key with a lower
    position that committed before it must arrive before it, and a row that committed
    after it (a position above every position visible once its COMMIT returned) must
    arrive after it; rows committed in between may arrive on either side.
    """

    id: str
    key: str
    position: int
    visible_after_commit: int
    """The highest position visible right after its COMMIT returned."""
    committed_before: frozenset[str]
    """Ids the writer had committed before this COMMIT was sent."""


@dataclass(frozen=True)
class OutboxRow:
    """One outbox row as the run found it."""

    status: str
    position: int


@dataclass(frozen=True)
class Effect:
    """One effect row: the message it applies, the topic it came in on, its apply number."""

    applied: int
    """From a sequence, drawn inside the handler's transaction: the order of application."""
    message_id: str
    topic: str


@dataclass
class History:
    """Everything one run recorded, ready to be judged."""

    kafka: bool
    topic: str
    written: list[Message]
    sequence: Mapping[uuid.UUID, int]
    """Each regular message's number within its key, in commit order."""
    rolled_back: set[str]
    outbox: dict[str, OutboxRow]
    delivered: list[Delivered]
    effects: list[Effect]
    late: list[LateCommit] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    """How often each of the scenario's faults happened; each must be at least 1."""


@dataclass
class Verdict:
    """What :func:`judge` found."""

    lost: int = 0
    wire_duplicates: int = 0
    applied_twice: int = 0
    order_violations: int = 0
    problems: list[str] = field(default_factory=list)


def judge(history: History) -> Verdict:
    """Every check of the suite over one history."""
    verdict = Verdict()
    committed = {str(m.id) for m in history.written}
    wire = check_deliveries(history.written, history.delivered, kafka=history.kafka)
    applied = Counter(effect.message_id for effect in history.effects)
    statuses = {i: row.status for i, row in history.outbox.items()}

    lost = set(wire.missing) | (committed - set(applied))
    verdict.lost = len(lost)
    verdict.wire_duplicates = wire.duplicates
    verdict.applied_twice = sum(1 for count in applied.values() if count > 1)
    order = wire_order(history) + late_order(history)
    verdict.order_violations = len(order)
    problems = verdict.problems
    note(problems, "never happened (the scenario's faults)", faults_missing(history.faults))
    note(problems, "lost: missing on the wire", wire.missing)
    note(problems, "lost: never handled", sorted(committed - set(applied)))
    note(problems, "order broken", order)
    note(problems, "effects applied out of order", effect_order(history))
    note(problems, "keys on more than one partition", key_partitions(history))
    note(problems, "applied twice", sorted(i for i, c in applied.items() if c > 1))
    note(problems, "content changed on the wire", wire.mismatches)
    note(problems, "on the wire but never committed", wire.unexpected)
    note(problems, "outbox rows no committed transaction wrote", sorted(set(statuses) - committed))
    note(problems, "committed without an outbox row", sorted(committed - set(statuses)))
    note(problems, "dead-lettered rows", sorted(i for i, s in statuses.items() if s == "dead"))
    note(problems, "effects of messages never committed", sorted(set(applied) - committed))
    rolled_back = history.rolled_back
    seen = {d.id for d in history.delivered}
    note(problems, "rolled-back rows in the outbox", sorted(rolled_back & set(statuses)))
    note(problems, "rolled-back rows on the wire", sorted(rolled_back & seen))
    note(problems, "rolled-back rows applied", sorted(rolled_back & set(applied)))
    return verdict


def note(problems: list[str], what: str, items: Sequence[str]) -> None:
    """Add ``"<n> <what>: <first five>"`` to ``problems`` when ``items`` is not empty."""
    if items:
        problems.append(f"{len(items)} {what}: {list(items[:5])}")


def faults_missing(faults: Mapping[str, int]) -> list[str]:
    """The faults a scenario counted that did not happen once."""
    return [f"{name}: {count}" for name, count in faults.items() if count < 1]


def first_deliveries(delivered: Iterable[Delivered]) -> dict[str, tuple[int, Delivered]]:
    """Each id's first delivery, with its place in arrival order."""
    first: dict[str, tuple[int, Delivered]] = {}
    for index, item in enumerate(delivered):
        first.setdefault(item.id, (index, item))
    return first


def _scope(history: History, message: Message) -> object:
    return (message.topic, message.key) if history.kafka else message.key


def wire_order(history: History) -> list[str]:
    """Regular messages whose first delivery is out of commit order within their scope."""
    late = {entry.id for entry in history.late}
    by_id = {str(m.id): m for m in history.written}
    last: dict[object, tuple[int, str]] = {}
    violations: list[str] = []
    for message_id, (_, _item) in sorted(
        first_deliveries(history.delivered).items(), key=lambda kv: kv[1][0]
    ):
        message = by_id.get(message_id)
        if message is None or message.key is None or message_id in late:
            continue
        number = history.sequence[message.id]
        scope = _scope(history, message)
        previous = last.get(scope)
        if previous is not None and number <= previous[0]:
            violations.append(
                f"key {message.key!r} on {message.topic}: #{number} ({message_id}) arrived "
                f"after #{previous[0]} ({previous[1]})"
            )
        last[scope] = (max(number, previous[0]) if previous else number, message_id)
    return violations


def late_order(history: History) -> list[str]:
    """Late commits that broke the promise of :class:`LateCommit` on the wire."""
    first = first_deliveries(history.delivered)
    by_id = {str(m.id): m for m in history.written}
    violations: list[str] = []
    for entry in history.late:
        if entry.id not in first:
            continue  # lost: reported as such
        place = first[entry.id][0]
        late_message = by_id[entry.id]
        for other_id, other in by_id.items():
            if other_id == entry.id or other.key != entry.key or other_id not in first:
                continue
            if _scope(history, other) != _scope(history, late_message):
                continue
            position = history.outbox[other_id].position if other_id in history.outbox else None
            if position is None:
                continue  # reported as committed without an outbox row
            other_place = first[other_id][0]
            if (
                position < entry.position
                and other_id in entry.committed_before
                and other_place > place
            ):
                violations.append(
                    f"late {entry.id} (key {entry.key!r}, position {entry.position}) arrived "
                    f"before {other_id} (position {position}), committed earlier"
                )
            elif position > entry.visible_after_commit and other_place < place:
                violations.append(
                    f"late {entry.id} (key {entry.key!r}, position {entry.position}) arrived "
                    f"after {other_id} (position {position}), committed after it"
                )
    return violations


def effect_order(history: History) -> list[str]:
    """Kafka: per partition of the scenario's topic, effects applied out of offset order.

    An effect counts for the topic it came in on (a storm copy on the twin topic is
    another record); each message's place is its first delivery's offset.
    """
    if not history.kafka:
        return []
    first = first_deliveries(history.delivered)
    last: dict[int, tuple[int, str]] = {}
    violations: list[str] = []
    for effect in sorted(history.effects, key=lambda e: e.applied):
        if effect.topic != history.topic or effect.message_id not in first:
            continue
        item = first[effect.message_id][1]
        partition, offset = int(item.extra["partition"]), int(item.extra["offset"])
        previous = last.get(partition)
        if previous is not None and offset < previous[0]:
            violations.append(
                f"partition {partition}: offset {offset} ({effect.message_id}) applied after "
                f"offset {previous[0]} ({previous[1]})"
            )
        if previous is None or offset > previous[0]:
            last[partition] = (offset, effect.message_id)
    return violations


def key_partitions(history: History) -> list[str]:
    """Kafka: (topic, key) pairs delivered on more than one partition."""
    if not history.kafka:
        return []
    partitions: dict[tuple[str, str | None], set[int]] = defaultdict(set)
    for item in history.delivered:
        if item.key is not None:
            partitions[(item.topic, item.key)].add(int(item.extra["partition"]))
    return [
        f"{key!r} on {topic}: {sorted(p)}" for (topic, key), p in partitions.items() if len(p) > 1
    ]
