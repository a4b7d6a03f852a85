"""The fault suite's checks bite: a history that was tampered with is caught.

Every scenario passes only if its check finds nothing; this proves, on RabbitMQ and on
Kafka, that the check finds what it must. A real run settles and passes; then copies of
its recorded history are tampered with — a delivery dropped, an effect dropped, doubled
or foreign, two deliveries of a key swapped, a body changed, a rolled-back row on the
wire, in the outbox or applied, a phantom, missing or dead outbox row, a fault that never
happened, a late commit before an earlier row or after a later one, a key on two Kafka
partitions, effects applied out of partition order — and each copy must fail through the
same :func:`~tests.faults.checks.judge` every scenario runs, with its own message; what
the promises allow (a late commit after a row committed before it, one key reordered
across two Kafka topics, any effect order on RabbitMQ) must pass. A committed message the
relay can never publish makes the settle phase report a stalled drain. And the crash
writer files a COMMIT the database crashed under by what the restarted server holds, both
ways, on a private PostgreSQL.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import psycopg
import pytest
from sqlalchemy.engine import Engine

from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.faults.checks import Effect, History, LateCommit, OutboxRow
from tests.faults.harness import Direct, Run, RunFactory
from tests.faults.settling import Snapshot, settle
from tests.support.database import count
from tests.support.private_postgres import PrivatePostgres
from tests.support.waiting import wait_until_sync
from tests.support.writing import CrashWriter, make_message

pytestmark = pytest.mark.timeout(120)
BROKERS = ["rabbitmq", "kafka"]


Tamper = Callable[[History], None]


@pytest.mark.parametrize("broker", BROKERS)
async def test_every_check_bites_on_a_recorded_history(
    broker: str, make_run: RunFactory, endpoints: Direct
) -> None:
    """A real run passes; then each tampered copy of its history fails with its message
    (or passes, where the promise allows what was changed), through the checks every
    scenario runs; a message the drain cannot deliver makes the settle phase report a
    stalled drain."""
    async with make_run("self-check", endpoints(broker)) as run:
        await run.start(relays=1)
        while run.writer.transactions < 10 or _longest_key(run) < 3:
            await run.pause(0.1, 0.2)
        await run.settle()
        clean = run.check()
        assert clean.passed, clean.problems
        assert clean.messages >= 50
        base = run.history()

        cases = _tamperings(base)
        found = {}
        for name, (tamper, expected) in cases.items():
            history = copy.deepcopy(base)
            tamper(history)
            found[name] = (run.check(history), expected)

        # A committed message the relay can never publish: the drain stalls.
        never = make_message(run.outbox, run.topic, "key-000", 0)
        run.writer.written.add([never], [999])
        await run.settle(stall=2.0)
        stalled = run.check()

    for name, (outcome, expected) in found.items():
        if expected is None:
            assert outcome.passed, (name, outcome.problems)
        else:
            assert not outcome.passed, name
            assert any(expected in problem for problem in outcome.problems), (
                name,
                expected,
                outcome.problems,
            )
    assert any(p.startswith("stalled drain: no progress for 2 s") for p in stalled.problems), (
        stalled.problems
    )


def _longest_key(run: Run) -> int:
    seen = run.seen_on_wire()
    keys = Counter(m.key for m in run.writer.written.messages if str(m.id) in seen)
    return max(keys.values(), default=0)


def _tamperings(base: History) -> dict[str, tuple[Tamper, str | None]]:
    """Each tampering, and the problem it must cause (None: the promise allows it)."""
    kafka = base.kafka
    by_key: dict[str | None, list[Message]] = {}
    for message in base.written:
        by_key.setdefault(message.key, []).append(message)
    # A key with three messages: a, b, c in commit (and position) order.
    a, b, c = next(group for group in by_key.values() if len(group) >= 3)[:3]
    first, second = str(a.id), str(b.id)

    def where(history: History, message_id: str) -> int:
        return next(i for i, d in enumerate(history.delivered) if d.id == message_id)

    def swap(history: History, one: str, two: str) -> None:
        i, j = where(history, one), where(history, two)
        items = history.delivered
        items[i], items[j] = items[j], items[i]

    def drop_delivery(history: History) -> None:
        history.delivered = [d for d in history.delivered if d.id != first]

    def drop_effect(history: History) -> None:
        history.effects = [e for e in history.effects if e.message_id != first]

    def double_effect(history: History) -> None:
        top = max(e.applied for e in history.effects)
        history.effects.append(Effect(top + 1, first, history.topic))

    def foreign_effect(history: History) -> None:
        history.effects.append(Effect(0, "never-committed", history.topic))

    def change_body(history: History) -> None:
        i = where(history, first)
        history.delivered[i] = dataclasses.replace(history.delivered[i], body=b"changed")

    def foreign_delivery(history: History) -> None:
        copy_of = history.delivered[where(history, first)]
        history.delivered.append(dataclasses.replace(copy_of, id="never-committed"))

    def rolled_back(place: str) -> Tamper:
        def tamper(history: History) -> None:
            ghost = "rolled-back-row"
            history.rolled_back.add(ghost)
            if place == "wire":
                copy_of = history.delivered[where(history, first)]
                history.delivered.append(dataclasses.replace(copy_of, id=ghost))
            elif place == "outbox":
                history.outbox[ghost] = OutboxRow("published", 0)
            else:
                history.effects.append(Effect(0, ghost, history.topic))

        return tamper

    def phantom_row(history: History) -> None:
        history.outbox["phantom"] = OutboxRow("pending", 0)

    def missing_row(history: History) -> None:
        del history.outbox[first]

    def dead_row(history: History) -> None:
        history.outbox[first] = dataclasses.replace(history.outbox[first], status="dead")

    def no_fault(history: History) -> None:
        history.faults = {"relays SIGKILLed": 0}

    def late(visible: str, moved: str) -> Tamper:
        """b becomes a late commit; its first delivery moves before a or after c."""

        def tamper(history: History) -> None:
            position = history.outbox[second].position
            seen = history.outbox[visible].position
            history.late.append(LateCommit(second, str(a.key), position, seen, frozenset({first})))
            i = where(history, second)
            item = history.delivered.pop(i)
            if moved == "before a":
                history.delivered.insert(where(history, first), item)
            else:
                history.delivered.insert(where(history, str(c.id)) + 1, item)

        return tamper

    def other_topic(history: History) -> None:
        """b goes to another topic (written and delivered alike), arriving before a."""
        renamed = dataclasses.replace(b, topic=f"{history.topic}.other")
        history.written = [renamed if m.id == b.id else m for m in history.written]
        history.delivered = [
            dataclasses.replace(d, topic=renamed.topic) if d.id == second else d
            for d in history.delivered
        ]
        history.effects = [
            dataclasses.replace(e, topic=renamed.topic) if e.message_id == second else e
            for e in history.effects
        ]
        swap(history, first, second)

    def second_partition(history: History) -> None:
        i = where(history, second)
        item = history.delivered[i]
        moved = {**item.extra, "partition": int(item.extra["partition"]) + 1}
        history.delivered[i] = dataclasses.replace(item, extra=moved)

    def effects_reversed(history: History) -> None:
        # Two messages of one key (one partition): swap the order they were applied in.
        numbers = {e.message_id: e.applied for e in history.effects}
        history.effects = [
            dataclasses.replace(e, applied=numbers[second])
            if e.message_id == first
            else dataclasses.replace(e, applied=numbers[first])
            if e.message_id == second
            else e
            for e in history.effects
        ]

    cases: dict[str, tuple[Tamper, str | None]] = {
        "missing on the wire": (drop_delivery, "lost: missing on the wire"),
        "never handled": (drop_effect, "lost: never handled"),
        "applied twice": (double_effect, "applied twice"),
        "effect never committed": (foreign_effect, "effects of messages never committed"),
        "order on the wire": (lambda h: swap(h, first, second), "order broken"),
        "content changed": (change_body, "content changed on the wire"),
        "on the wire, never committed": (foreign_delivery, "on the wire but never committed"),
        "rolled back, on the wire": (rolled_back("wire"), "rolled-back rows on the wire"),
        "rolled back, in the outbox": (rolled_back("outbox"), "rolled-back rows in the outbox"),
        "rolled back, applied": (rolled_back("effects"), "rolled-back rows applied"),
        "phantom outbox row": (phantom_row, "outbox rows no committed transaction wrote"),
        "missing outbox row": (missing_row, "committed without an outbox row"),
        "dead row": (dead_row, "dead-lettered rows"),
        "a fault that never happened": (no_fault, "never happened"),
        "late commit before an earlier row": (late(second, "before a"), "order broken"),
        "late commit after a later row": (late(second, "after c"), "order broken"),
        # c committed before the late b (visible when b committed): either side is allowed.
        "late commit after a row committed before it": (late(str(c.id), "after c"), None),
        # Same key, other topic: Kafka orders (topic, key) only; RabbitMQ's queue the key.
        "same key, other topic, reordered": (other_topic, None if kafka else "order broken"),
    }
    if kafka:
        cases["a key on two partitions"] = (second_partition, "keys on more than one partition")
        cases["effects out of partition order"] = (effects_reversed, "effects applied out of order")
    else:
        # RabbitMQ handles deliveries concurrently: the consumer promises no effect order.
        cases["effects in another order"] = (effects_reversed, None)
    return cases


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("settles", None),
        ("never drains", "stalled drain: no progress for 0.5 s at 0 rows unpublished, 1 not"),
        ("broker holds one", "stalled drain: no progress for 0.5 s at"),
        ("keeps delivering", "stalled drain: deliveries or effects still changing 0.8 s"),
    ],
)
async def test_the_settle_phase_waits_for_quiet_and_reports_a_stalled_drain(
    case: str, expected: str | None
) -> None:
    """The settle loop every run uses, fed scripted snapshots: it returns once drained and
    quiet, and fails as a stalled drain when nothing moves or when copies keep coming."""
    looks = 0

    def probe() -> Snapshot:
        nonlocal looks
        looks += 1
        if case == "never drains":
            return Snapshot(0, 1, 1, "", 10, 10)
        if case == "broker holds one":
            return Snapshot(0, 0, 0, "q 0 ready, 1 unacked", 11, 11)
        if case == "keeps delivering":
            return Snapshot(0, 0, 0, "", 11, 11 + looks)
        return Snapshot(0, 0, 0, "", 11, 11 + min(looks, 3))

    started = time.monotonic()
    failure = await settle(probe, quiet=0.3, stall=0.5, interval=0.02)
    if expected is None:
        assert failure is None
        assert time.monotonic() - started >= 0.3
    else:
        assert failure is not None
        assert failure.startswith(expected), failure


@pytest.mark.parametrize("fate", ["committed", "rolled back"])
def test_a_commit_cut_off_by_a_crash_is_settled_after_the_restart(
    fate: str, private_postgres: PrivatePostgres, private_tables: Tables, private_engine: Engine
) -> None:
    """The crash writer files a COMMIT that died with the server by what the restarted
    server holds: one whose WAL was flushed (it then waited for a synchronous standby that
    does not exist) as committed, one still running a deferred trigger as rolled back."""
    outbox_table = quoted_table(private_tables.outbox)
    if fate == "committed":
        setup = ["ALTER SYSTEM SET synchronous_standby_names = 'absent'", "SELECT pg_reload_conf()"]
        waiting = "SyncRep"
    else:
        setup = [
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(600); RETURN NULL; END $$",
            f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {outbox_table} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        ]
        waiting = "PgSleep"
    _autocommit(private_postgres, setup)
    writer = CrashWriter(
        private_engine, Outbox(private_tables), "settle", threads=1, rows_per_transaction=3
    )
    batch, numbers = writer.next_batch(writer.keys, random.Random(0))
    thread = threading.Thread(target=writer.transaction, args=(batch, numbers), daemon=True)
    thread.start()
    in_flight = "SELECT count(*) FROM pg_stat_activity WHERE query = 'COMMIT' AND wait_event = :w"
    wait_until_sync(lambda: count(private_engine, in_flight, w=waiting), what="a COMMIT waiting")

    private_postgres.kill()
    private_postgres.start()
    thread.join(60)
    _autocommit(private_postgres, ["ALTER SYSTEM RESET ALL", "SELECT pg_reload_conf()"])

    assert writer.error is None
    ids = {str(m.id) for m in batch}
    stored_sql = f"SELECT count(*) FROM {outbox_table} WHERE id = ANY(:i)"
    stored = count(private_engine, stored_sql, i=[m.id for m in batch])
    if fate == "committed":
        assert (writer.unknown_committed, writer.unknown_rolled_back, stored) == (1, 0, 3)
        assert (writer.written.ids(), writer.rolled_back.ids()) == (ids, set())
    else:
        assert (writer.unknown_committed, writer.unknown_rolled_back, stored) == (0, 1, 0)
        assert (writer.written.ids(), writer.rolled_back.ids()) == (set(), ids)


def _autocommit(server: PrivatePostgres, statements: list[str]) -> None:
    with psycopg.connect(server.conninfo, autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)
