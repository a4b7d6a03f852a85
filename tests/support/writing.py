"""Write keyed messages through the public Outbox as a business would, and remember them.

:class:`PacedWriter` is a thread committing small transactions until stopped; every key's
messages are numbered in commit order (:class:`Written` keeps the numbers), which is what
per-key order checks compare deliveries with.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.message import Message
from postroom.outbox import Outbox


@dataclass
class Written:
    """Messages committed to the outbox, and each one's number within its key."""

    messages: list[Message] = field(default_factory=list)
    sequence: dict[uuid.UUID, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, batch: Sequence[Message], numbers: Sequence[int]) -> None:
        with self.lock:
            self.messages.extend(batch)
            self.sequence.update({m.id: n for m, n in zip(batch, numbers, strict=True)})

    def seq(self, message: Message) -> int:
        """The message's number within its key."""
        return self.sequence[message.id]

    def ids(self, topic: str | None = None) -> set[str]:
        """Ids written (to ``topic``, if given), as strings."""
        with self.lock:
            return {str(m.id) for m in self.messages if topic is None or m.topic == topic}

    def of(self, topics: Sequence[str]) -> list[Message]:
        """Messages written to any of ``topics``."""
        with self.lock:
            return [m for m in self.messages if m.topic in topics]


def make_message(outbox: Outbox, topic: str, key: str, number: int) -> Message:
    """A keyed message; every 10th carries raw bytes, the rest JSON with the key's number."""
    headers = {"tenant": f"tenant-{hash(key) % 5}", "trace-id": uuid.uuid4().hex, "note": "ünï ✓"}
    if number % 10 == 9:
        body = bytes([number % 256, 0, 255, 10, 13]) + key.encode() + b"\x00raw"
        return outbox.message(
            topic, body, key=key, headers=headers, content_type="application/x-postroom-test"
        )
    payload = {"key": key, "seq": number, "text": "grüße ✓", "pad": "x" * (number % 37)}
    return outbox.message(topic, payload, key=key, headers=headers)


def commit(engine: Engine, outbox: Outbox, batch: Sequence[Message]) -> None:
    """One business transaction that enqueues ``batch`` (a SQLAlchemy Session)."""
    with Session(engine) as session, session.begin():
        outbox.enqueue_many(session, batch)


class PacedWriter:
    """A thread committing small transactions of keyed messages until stopped.

    Each key's messages are numbered in commit order. The topic can be switched while it
    runs (``writer.topic = ...``), so phases of a test can write to topics of their own.
    """

    def __init__(
        self,
        engine: Engine,
        outbox: Outbox,
        topic: str,
        *,
        keys: int = 20,
        rows_per_transaction: int = 10,
        interval: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.topic = topic
        self.keys = [f"key-{i:03d}" for i in range(keys)]
        self.rows = rows_per_transaction
        self.interval = interval
        self.rng = rng or random.Random()
        self.written = Written()
        self.transactions = 0
        self._numbers = dict.fromkeys(self.keys, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-writer", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> PacedWriter:
        self._thread.start()
        return self

    def write_once(self) -> None:
        batch, numbers = [], []
        for _ in range(self.rows):
            key = self.rng.choice(self.keys)
            number = self._numbers[key]
            self._numbers[key] = number + 1
            batch.append(make_message(self.outbox, self.topic, key, number))
            numbers.append(number)
        commit(self.engine, self.outbox, batch)
        self.written.add(batch, numbers)
        self.transactions += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.write_once()
                self._stop.wait(self.interval)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> Written:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, f"the writer failed: {self.error!r}"
        return self.written
