"""The settle phase: a run is judged only once nothing can still arrive.

After the writer stops, a run waits until every committed message was published, seen on
the wire and handled (the drain), then until the broker holds nothing more for the
consumer — RabbitMQ: no message ready or unacknowledged in the consumer's queue and its
retry queues; Kafka: the consumer group's committed offsets at the end of every partition
of its topics — and until the effect rows and the deliveries seen on the wire have not
changed for a quiet period longer than the broker's redelivery window (the Kafka group's
session timeout). A double apply or a redelivery later than a moment after the drain is
then still seen. A settle that stops making progress for the drain time fails the run as
a stalled drain, naming what was still outstanding.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.support.services import QuietLog

KAFKA_SESSION_TIMEOUT = 3.0
"""The scenario consumers' ``session.timeout.ms``, in seconds: a killed member leaves the
group, and its partitions move, after this long."""
QUIET = {"kafka": KAFKA_SESSION_TIMEOUT + 0.5, "rabbitmq": 1.0}
"""Seconds effects and deliveries must stay unchanged before a run is judged. Kafka hands a
dead member's partitions on after the session timeout, and the new owner redelivers from
the committed offset; RabbitMQ redelivers only what it still holds (checked directly), so
its quiet period is a margin for publishes in flight."""


@dataclass(frozen=True)
class Snapshot:
    """Where a run stands while it settles."""

    unpublished: int
    off_wire: int
    unhandled: int
    backlog: str
    """What the broker still holds for the consumer, in words; empty when nothing."""
    effects: int
    deliveries: int

    @property
    def drained(self) -> bool:
        """Everything published, on the wire and handled, and nothing left on the broker."""
        return not (self.unpublished or self.off_wire or self.unhandled or self.backlog)

    def describe(self) -> str:
        """The outstanding work, in words."""
        return (
            f"{self.unpublished} rows unpublished, {self.off_wire} not on the wire, "
            f"{self.unhandled} not handled, broker: {self.backlog or 'nothing held'}"
        )


async def settle(
    probe: Callable[[], Snapshot], *, quiet: float, stall: float, interval: float = 0.25
) -> str | None:
    """Look (``probe``, on a thread) until drained and quiet for ``quiet`` seconds.

    Returns None once settled, or the failure ("stalled drain: ...") when nothing moved
    for ``stall`` seconds before that, or when, all drained, deliveries or effects still
    kept changing ``stall`` seconds past the quiet period.
    """
    progress_at = quiet_since = drained_since = time.monotonic()
    last: Snapshot | None = None
    while True:
        now_snapshot = await asyncio.to_thread(probe)
        now = time.monotonic()
        if not now_snapshot.drained:
            drained_since = now
        if last is None or now_snapshot != last:
            progress_at = now
        if last is None or (now_snapshot.effects, now_snapshot.deliveries) != (
            last.effects,
            last.deliveries,
        ):
            quiet_since = now
        last = now_snapshot
        if now_snapshot.drained and now - quiet_since >= quiet:
            return None
        if not now_snapshot.drained and now - progress_at > stall:
            return f"stalled drain: no progress for {stall:g} s at {now_snapshot.describe()}"
        if now_snapshot.drained and now - drained_since > quiet + stall:
            return (
                f"stalled drain: deliveries or effects still changing {quiet + stall:g} s "
                f"after everything was handled ({now_snapshot.deliveries} deliveries, "
                f"{now_snapshot.effects} effects)"
            )
        await asyncio.sleep(interval)


def rabbitmq_backlog(queue_prefix: str) -> str:
    """Messages ready or unacknowledged in the queues named ``queue_prefix`` or
    ``queue_prefix.*`` (``rabbitmqctl list_queues`` on this machine's RabbitMQ)."""
    command = shutil.which("rabbitmqctl")
    if command is None:
        raise AssertionError("rabbitmqctl is not on PATH: the settle phase needs it")
    listed = subprocess.run(
        [
            command,
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if listed.returncode != 0:
        return f"rabbitmqctl failed ({listed.returncode}): {listed.stderr.strip()[:200]}"
    held = []
    for line in listed.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3 or not (
            parts[0] == queue_prefix or parts[0].startswith(queue_prefix + ".")
        ):
            continue
        if parts[0].endswith(".dead-letter"):
            continue  # a dead letter is judged as a lost message, not waited for
        ready, unacked = int(parts[1]), int(parts[2])
        if ready or unacked:
            held.append(f"{parts[0]} {ready} ready, {unacked} unacked")
    return "; ".join(held)


class KafkaLag:
    """The consumer group's committed offsets against each partition's end."""

    def __init__(self, bootstrap: str, group: str, topics: Sequence[str]) -> None:
        from confluent_kafka import Consumer

        self.topics = list(topics)
        self._consumer: Any = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "logger": QuietLog(),
            }
        )

    def backlog(self, floors: dict[tuple[str, int], int] | None = None) -> str:
        """Partitions whose committed offset is short of their end (the larger of the
        broker's high watermark and ``floors``, one past the last offset read back)."""
        from confluent_kafka import TopicPartition

        partitions = []
        for topic in self.topics:
            metadata = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is not None and metadata.partitions:
                partitions += [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        committed = self._consumer.committed(partitions, timeout=10)
        behind = []
        for part in committed:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(part.topic, part.partition), timeout=10
            )
            end = max(high, (floors or {}).get((part.topic, part.partition), 0))
            at = part.offset if part.offset >= 0 else low
            if at < end:
                behind.append(f"{part.topic}[{part.partition}] committed {part.offset} < end {end}")
        return "; ".join(behind)

    def close(self) -> None:
        """Close the client (it never joined the group)."""
        self._consumer.close()
