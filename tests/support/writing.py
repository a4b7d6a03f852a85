"""Write keyed messages through the public Outbox as a business would, and remember them.

:class:`PacedWriter` is a thread committing small transactions until stopped; every key's
messages are numbered in commit order (:class:`Written` keeps the numbers), which is what
per-key order checks compare deliveries with. :class:`CrashWriter` is its kind for a
database that crashes: several threads that keep writing through the crash and settle a
COMMIT of unknown outcome by reading the database once it is back.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema.sql import quoted_table
from tests.support.waiting import wait_until_sync


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
        self.rolled_back = Written()
        """Messages of transactions that did not commit (kept by :class:`CrashWriter`, and by
        tests that roll back on purpose), which must never be published."""
        self.transactions = 0
        self._numbers = dict.fromkeys(self.keys, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-writer", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> PacedWriter:
        self._thread.start()
        return self

    def next_batch(
        self, keys: Sequence[str], rng: random.Random
    ) -> tuple[list[Message], list[int]]:
        """The next transaction's messages (keys drawn from ``keys``) and their numbers."""
        batch, numbers = [], []
        for _ in range(self.rows):
            key = rng.choice(keys)
            number = self._numbers[key]
            self._numbers[key] = number + 1
            batch.append(make_message(self.outbox, self.topic, key, number))
            numbers.append(number)
        return batch, numbers

    def write_once(self) -> None:
        """Commit one transaction and remember its messages."""
        batch, numbers = self.next_batch(self.keys, self.rng)
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


class CrashWriter(PacedWriter):
    """Writers (threads, each on keys of its own) committing on through database crashes.

    Each transaction enqueues its rows, lingers a random moment (other business work) and
    commits. It counts as committed only once its COMMIT returned. One that could not
    connect is skipped; one that failed before its COMMIT was sent rolled back. One whose
    COMMIT failed (the server died under it) has an unknown outcome: the thread reads the
    outbox for the transaction's ids once a server started after that COMMIT answers — all
    there: committed; none: rolled back; some: atomicity broken, the writer fails. Rolled
    back messages are kept in :attr:`rolled_back`, so a check can prove none was published.
    """

    def __init__(
        self,
        *args: Any,
        threads: int = 3,
        linger: float = 0.02,
        resolve_within: float = 120.0,
        **options: Any,
    ) -> None:
        super().__init__(*args, **options)
        self.linger = linger
        """Longest pause between a transaction's INSERT and its COMMIT (other business work),
        so a crash often lands inside a transaction."""
        self.resolve_within = resolve_within
        self.refused = 0
        """Transactions that found no server to connect to."""
        self.failed_before_commit = 0
        """Transactions that failed after they began and before COMMIT was sent."""
        self.unknown_committed = 0
        """COMMITs that failed, found committed once the server was back."""
        self.unknown_rolled_back = 0
        """COMMITs that failed, found rolled back once the server was back."""
        self._counts = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._write_keys,
                args=(self.keys[i::threads], random.Random(self.rng.random())),
                name=f"crash-writer-{i}",
                daemon=True,
            )
            for i in range(threads)
        ]

    def start(self) -> CrashWriter:
        """Start every writer thread."""
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Written:
        """Stop the threads (each settles its last transaction first) and return what committed."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.resolve_within + 30)
        assert self.error is None, f"a writer failed: {self.error!r}"
        return self.written

    def _write_keys(self, keys: Sequence[str], rng: random.Random) -> None:
        try:
            while not self._stop.is_set():
                self.transaction(*self.next_batch(keys, rng))
                self._stop.wait(self.interval)
        except BaseException as exc:
            self.error = exc

    def _count(self, name: str) -> None:
        with self._counts:
            setattr(self, name, getattr(self, name) + 1)

    def transaction(self, batch: list[Message], numbers: list[int]) -> None:
        """Commit ``batch`` in one transaction and file it as committed or rolled back."""
        session = Session(self.engine)
        try:
            try:
                session.connection()
            except DBAPIError:
                self._count("refused")
                return
            try:
                self.outbox.enqueue_many(session, batch)
                time.sleep(random.uniform(0, self.linger))
                session.execute(text("SELECT 1"))
            except DBAPIError:
                self._count("failed_before_commit")
                self.rolled_back.add(batch, numbers)
                return
            sent_at = datetime.now(UTC)
            try:
                session.commit()
            except DBAPIError:
                committed = self._resolve(batch, sent_at)
                self._count("unknown_committed" if committed else "unknown_rolled_back")
            else:
                committed = True
            (self.written if committed else self.rolled_back).add(batch, numbers)
            if committed:
                self._count("transactions")
        finally:
            with contextlib.suppress(DBAPIError):
                session.close()

    def _resolve(self, batch: Sequence[Message], sent_at: datetime) -> bool:
        """Whether the transaction of ``batch``, whose COMMIT failed, committed."""
        outbox = quoted_table(self.outbox.tables.outbox)
        sql = text(
            f"SELECT pg_postmaster_start_time() > :sent, count(*) FROM {outbox} "
            "WHERE id = ANY(:ids)"
        )
        params = {"sent": sent_at, "ids": [m.id for m in batch]}

        def look() -> tuple[int] | None:
            try:
                with self.engine.connect() as connection:
                    restarted, found = connection.execute(sql, params).one()
            except DBAPIError:
                return None
            return (int(found),) if restarted else None

        (found,) = wait_until_sync(
            look,
            within=self.resolve_within,
            interval=0.1,
            what="a restarted server, to settle a COMMIT of unknown outcome",
        )
        assert found in (0, len(batch)), (
            f"{found} of the {len(batch)} rows of one transaction are in the outbox"
        )
        return found == len(batch)
