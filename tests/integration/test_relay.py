"""The relay in-process against real PostgreSQL and the in-memory broker.

Process-level proofs (kill -9, SIGSTOP, real brokers) are in test_relay_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom import Settings
from postroom.backoff import Backoff
from postroom.brokers.memory import MemoryBroker
from postroom.errors import DatabaseError
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.relay.leases import PartitionLeases
from postroom.relay.store import (
    CONFIRMED,
    REJECTED,
    BatchOutcomes,
    Claim,
    ClaimedRow,
    Connection,
    OutboxStore,
    RowOutcome,
)
from postroom.schema import PARTITION_COUNT, Tables, relay_sql
from tests.support.relaying import TimedPublisher, outbox_rows, relay_settings, running_relay
from tests.support.spacing import assert_spaced
from tests.support.waiting import wait_until


@pytest.fixture
def settings(database_url: str, tables: Tables) -> Settings:
    """Relay settings with short leases and backoff, so tests run in seconds."""
    return relay_settings(database_url, tables)


def write(engine: Engine, outbox: Outbox, messages: list[tuple[str, Any, str | None]]) -> list[Any]:
    with Session(engine) as session:
        written = outbox.enqueue_many(
            session, [outbox.message(topic, payload, key=key) for topic, payload, key in messages]
        )
        session.commit()
    return written


def status_of(engine: Engine, tables: Tables, message_id: Any) -> str:
    return str(next(r.status for r in outbox_rows(engine, tables) if r.id == message_id))


def by_key(broker: MemoryBroker) -> dict[str | None, list[int]]:
    seen: dict[str | None, list[int]] = {}
    for message in broker.messages():
        seen.setdefault(message.key, []).append(message.payload)
    return seen


async def test_publishes_every_row_as_written_and_marks_it(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    written = write(engine, outbox, [("orders", i, f"k{i % 7}") for i in range(300)])
    async with running_relay(Relay(settings, broker.publisher())):
        await wait_until(lambda: len(broker.messages()) == 300, within=15)
        await wait_until(
            lambda: all(r.status == "published" for r in outbox_rows(engine, tables)), within=15
        )
    delivered = {m.id: m for m in broker.messages()}
    for message in written:
        got = delivered[message.id]
        assert (got.topic, got.key, got.body, got.content_type) == (
            message.topic,
            message.key,
            message.body,
            message.content_type,
        )
    assert all(seq == sorted(seq) for seq in by_key(broker).values())
    assert all(r.published_at is not None for r in outbox_rows(engine, tables))


async def test_hot_keys_stay_in_order_across_many_batches(
    settings: Settings, engine: Engine, outbox: Outbox
) -> None:
    broker = MemoryBroker()
    for start in range(0, 2000, 250):
        write(engine, outbox, [("t", i, f"k{i % 3}") for i in range(start, start + 250)])
    relay = Relay(Settings(**{**settings.__dict__, "relay_batch_size": 64}), broker.publisher())
    async with running_relay(relay):
        await wait_until(lambda: len(broker.messages()) == 2000, within=15)
    for key, sequence in by_key(broker).items():
        assert sequence == sorted(sequence), key


async def test_delete_on_publish_when_retention_is_zero(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    write(engine, outbox, [("t", i, None) for i in range(50)])
    relay = Relay(Settings(**{**settings.__dict__, "relay_retention": 0.0}), broker.publisher())
    async with running_relay(relay):
        await wait_until(lambda: outbox_rows(engine, tables) == [], within=15)
    assert len(broker.messages()) == 50


async def test_poison_row_retries_with_backoff_then_is_dead_lettered_while_others_flow(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker(unroutable=["nowhere"])
    first = write(engine, outbox, [("nowhere", 0, "poisoned"), ("t", 1, "poisoned")])
    others = write(engine, outbox, [("t", i, f"k{i}") for i in range(20)])
    poison, waiting = first
    publisher = TimedPublisher(broker.publisher())
    async with running_relay(Relay(settings, publisher)):
        await wait_until(lambda: len(broker.messages()) == 20, within=15)
        # The poisoned key's later row waits while the poison row is retried.
        state = {r.id: r for r in outbox_rows(engine, tables)}
        assert state[waiting.id].status == "pending"
        assert waiting.id not in {m.id for m in broker.messages()}
        await wait_until(lambda: status_of(engine, tables, poison.id) == "dead", within=15)
        # Once the poison row is dead-lettered, the key flows again, in order.
        await wait_until(lambda: waiting.id in {m.id for m in broker.messages()}, within=15)
    dead = {r.id: r for r in outbox_rows(engine, tables)}[poison.id]
    assert dead.attempts == settings.relay_max_attempts
    assert "unroutable" in dead.last_error
    assert dead.dead_lettered_at is not None
    assert dead.published_at is None
    assert {m.id for m in broker.messages()} == {m.id for m in others} | {waiting.id}
    backoff = Backoff(settings.relay_backoff_initial, settings.relay_backoff_max)
    assert len(publisher.sent[poison.id]) == settings.relay_max_attempts
    assert_spaced(publisher.sent[poison.id], backoff, slack=settings.relay_poll_interval + 0.6)


async def test_broker_outage_burns_no_attempts_and_resumes_by_itself(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    relay = Relay(settings, broker.publisher())
    async with running_relay(relay):
        write(engine, outbox, [("t", i, f"k{i % 4}") for i in range(5)])
        await wait_until(lambda: len(broker.messages()) == 5, within=15)
        # The broker goes away while the relay is running: its publishes come back
        # UNAVAILABLE, which must not cost the rows an attempt.
        broker.start_outage()
        write(engine, outbox, [("t", i, f"k{i % 4}") for i in range(5, 45)])
        await wait_until(lambda: relay.metrics.unavailable._value.get() > 0, within=15)
        await wait_until(lambda: not relay.ready, within=15)
        assert len(broker.messages()) == 5
        assert all(r.attempts == 0 for r in outbox_rows(engine, tables) if r.status == "pending")
        broker.end_outage()
        await wait_until(lambda: len(broker.messages()) == 45, within=15)
        await wait_until(
            lambda: all(r.status == "published" for r in outbox_rows(engine, tables)), within=15
        )
    assert all(r.attempts == 0 for r in outbox_rows(engine, tables))


async def test_delayed_messages_wait_until_due(
    settings: Settings, engine: Engine, outbox: Outbox
) -> None:
    broker = MemoryBroker()
    with Session(engine) as session:
        later = outbox.enqueue(session, "t", "later", delay=timedelta(seconds=1.5))
        now = outbox.enqueue(session, "t", "now")
        session.commit()
    async with running_relay(Relay(settings, broker.publisher())):
        await wait_until(lambda: len(broker.messages()) == 1, within=15)
        assert broker.messages()[0].id == now.id
        started = time.monotonic()
        await wait_until(lambda: len(broker.messages()) == 2, within=15)
    assert broker.messages()[1].id == later.id
    assert time.monotonic() - started > 0.5


def owners(engine: Engine, tables: Tables) -> dict[str | None, int]:
    with engine.connect() as connection:
        found = connection.execute(
            select(tables.partitions.c.owner, text("count(*)")).group_by(tables.partitions.c.owner)
        ).all()
    return dict(found)


def owned_counts(engine: Engine, tables: Tables) -> list[int]:
    """Partitions per relay, smallest first; unowned partitions are left out."""
    return sorted(n for owner, n in owners(engine, tables).items() if owner is not None)


async def test_relays_share_the_partitions_and_take_over_when_one_stops(
    settings: Settings, engine: Engine, tables: Tables
) -> None:
    broker = MemoryBroker()
    relays = [
        Relay(Settings(**{**settings.__dict__, "relay_id": f"relay-{n}"}), broker.publisher())
        for n in range(3)
    ]
    async with running_relay(relays[0]), running_relay(relays[1]):
        async with running_relay(relays[2]):
            await wait_until(lambda: owned_counts(engine, tables) == [21, 21, 22], within=15)
        # relay-2 released its partitions on a clean stop; the other two share them.
        await wait_until(lambda: owned_counts(engine, tables) == [32, 32], within=15)
    assert owners(engine, tables) == {None: PARTITION_COUNT}
    with engine.connect() as connection:
        assert connection.execute(select(tables.relays)).all() == []


async def test_a_stalled_relay_cannot_mark_rows_another_relay_took_over(
    database_url: str, conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    write(engine, outbox, [("t", i, "k") for i in range(5)])
    leases_a = PartitionLeases(Connection(conninfo, database_url), tables, "relay-a", 30)
    store_a = OutboxStore(Connection(conninfo, database_url), tables)
    await leases_a.heartbeat()
    assert len(leases_a.owned) == PARTITION_COUNT
    first = await store_a.claim(leases_a.tokens, limit=10)
    assert len(first.rows) == 5
    # relay-a stalls past its lease; relay-b sees it gone and takes its partitions.
    with engine.begin() as connection:
        connection.execute(
            update(tables.partitions).values(lease_expires_at=text("now() - interval '1 second'"))
        )
        connection.execute(tables.relays.delete())
    leases_b = PartitionLeases(Connection(conninfo, database_url), tables, "relay-b", 30)
    store_b = OutboxStore(Connection(conninfo, database_url), tables)
    await leases_b.heartbeat()
    assert leases_b.owned == leases_a.owned
    second = await store_b.claim(leases_b.tokens, limit=10)
    assert [r.position for r in second.rows] == [r.position for r in first.rows]

    def confirmed(claim: Claim) -> BatchOutcomes:
        return BatchOutcomes.of(
            [
                RowOutcome(r.position, claim.tokens[r.partition], r.attempts, r.due_at, CONFIRMED)
                for r in claim.rows
            ]
        )

    stale = await store_a.mark(confirmed(first), max_attempts=3, delete_published=False)
    assert stale == []
    assert all(r.status == "pending" for r in outbox_rows(engine, tables))
    marked = await store_b.mark(confirmed(second), max_attempts=3, delete_published=False)
    assert len(marked) == 5
    assert all(r.status == "published" for r in outbox_rows(engine, tables))
    # relay-a learns at its next heartbeat that it lost every partition.
    await leases_a.heartbeat()
    assert leases_a.owned == frozenset()


async def test_retention_purges_old_published_rows_in_batches(
    database_url: str, conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    write(engine, outbox, [("t", i, None) for i in range(30)])
    with engine.begin() as connection:
        connection.execute(
            update(tables.outbox)
            .where(
                tables.outbox.c.position
                <= text(f'(SELECT min(position) + 19 FROM "{tables.schema}".outbox)')
            )
            .values(status="published", published_at=text("now() - interval '2 hours'"))
        )
    store = OutboxStore(Connection(conninfo, database_url), tables)
    assert await store.purge_published(3600, limit=15) == 15
    assert await store.purge_published(3600, limit=15) == 5
    assert await store.purge_published(3600, limit=15) == 0
    assert [r.status for r in outbox_rows(engine, tables)] == ["pending"] * 10
    pending, oldest, dead = await store.backlog()
    assert (pending, dead) == (10, 0)
    assert oldest >= 0


def test_the_claim_walks_the_pending_index(
    conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """With a large history of published rows, the claim reads only pending rows."""
    schema = tables.schema
    with engine.begin() as connection:
        connection.execute(
            text(
                f'INSERT INTO "{schema}".outbox (id, topic, partition, payload, content_type, '
                "created_at, available_at, status, published_at) "
                "SELECT gen_random_uuid(), 't', g % 64, '\\x00', 'application/octet-stream', "
                "now(), now(), 'published', now() FROM generate_series(1, 20000) g"
            )
        )
    write(engine, outbox, [("t", i, f"k{i}") for i in range(200)])
    with engine.begin() as connection:
        connection.execute(text(f'ANALYZE "{schema}".outbox'))
    with psycopg.connect(conninfo) as connection:
        explained = connection.execute(
            "EXPLAIN (FORMAT JSON) " + relay_sql.claim_sql(tables),
            {
                "partitions": list(range(64)),
                "limit": 500,
                "in_flight": [1, 2, 3],
                "max_bytes": 8 << 20,
            },
        ).fetchone()
    assert explained is not None
    plan_text = json.dumps(explained[0])
    assert "outbox_pending_idx" in plan_text
    assert '"Seq Scan"' not in plan_text


async def test_metrics_and_health_endpoints(
    settings: Settings, engine: Engine, outbox: Outbox, unused_tcp_port: int
) -> None:
    broker = MemoryBroker()
    write(engine, outbox, [("t", i, None) for i in range(10)])
    relay = Relay(
        Settings(**{**settings.__dict__, "metrics_port": unused_tcp_port}), broker.publisher()
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{unused_tcp_port}{path}") as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    async with running_relay(relay):
        await wait_until(lambda: len(broker.messages()) == 10, within=15)
        await wait_until(lambda: relay.ready, within=15)
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert "postroom_relay_published_total 10.0" in body
        assert "postroom_relay_owned_partitions 64.0" in body
        assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
        assert await asyncio.to_thread(get, "/readyz") == (200, "ok\n")
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404


async def test_rows_of_a_long_transaction_committing_late_are_published_in_order(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """Lower positions committed after higher ones were published are never skipped."""
    broker = MemoryBroker()
    long_running = Session(engine)
    late = [outbox.enqueue(long_running, "t", {"late": i}, key="late-key") for i in range(3)] + [
        outbox.enqueue(long_running, "t", {"late": 9}, key=None)
    ]
    async with running_relay(Relay(settings, broker.publisher())):
        for round_ in range(5):
            write(engine, outbox, [("t", {"round": round_, "i": i}, f"k{i}") for i in range(20)])
        await wait_until(lambda: len(broker.messages()) == 100, within=15)
        assert {m.id for m in late}.isdisjoint(m.id for m in broker.messages())
        long_running.commit()
        long_running.close()
        await wait_until(lambda: len(broker.messages()) == 104, within=15)
        # Rows of that key written after the late commit follow them.
        after = write(engine, outbox, [("t", {"late": 3}, "late-key")])
        await wait_until(lambda: len(broker.messages()) == 105, within=15)
    late_key = [m for m in broker.messages() if m.key == "late-key"]
    assert [m.id for m in late_key] == [m.id for m in late[:3]] + [after[0].id]
    positions = {r.id: r.position for r in outbox_rows(engine, tables)}
    assert max(positions[m.id] for m in late) < min(
        positions[m.id] for m in broker.messages()[:100]
    )
    assert all(r.status == "published" for r in outbox_rows(engine, tables))


# Regression tests from the relay review: each failed before its fix.


async def test_a_failed_mark_does_not_strand_the_next_batch(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    write(engine, outbox, [("t", i, f"k{i % 10}") for i in range(200)])
    relay = Relay(Settings(**{**settings.__dict__, "relay_batch_size": 50}), broker.publisher())
    real_mark = relay._marks.mark
    calls = 0

    async def flaky_mark(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 5:  # the first batch's mark fails through all its retries
            raise DatabaseError("simulated: the database is restarting")
        return await real_mark(*args, **kwargs)

    relay._marks.mark = flaky_mark  # type: ignore[method-assign]
    async with running_relay(relay):
        await wait_until(
            lambda: all(r.status == "published" for r in outbox_rows(engine, tables)), within=15
        )
        # The last mark's commit is seen before its batch is let go in memory: wait for it.
        await wait_until(lambda: relay._batches.positions() == [], within=5)
        await wait_until(lambda: relay._busy_partitions() == frozenset(), within=5)
    assert {m.id for m in broker.messages()} == {r.id for r in outbox_rows(engine, tables)}


async def test_the_next_batch_is_read_ahead_only_under_a_backlog(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """A full batch means a backlog: the next claim overlaps its publish. After a partial
    batch the next claim waits for the publish, so rows committed meanwhile go next."""
    broker = MemoryBroker()
    relay = Relay(Settings(**{**settings.__dict__, "relay_batch_size": 50}), broker.publisher())
    publisher, claim = relay.publisher, relay._store.claim
    publishing: list[int] = []
    overlapped: list[int] = []
    late: list[Any] = []

    async def slow_publish(batch: Any) -> Any:
        publishing.append(len(batch))
        try:
            await asyncio.sleep(0.1)
            if not late:  # committed while the first (partial) batch is being published
                late.extend(write(engine, outbox, [("t", "late", "late")]))
            return await publisher.publish(batch)
        finally:
            publishing.pop()

    async def watched_claim(*args: Any, **kwargs: Any) -> Any:
        if publishing:
            overlapped.append(publishing[-1])
        return await claim(*args, **kwargs)

    slow: Any = type("Slow", (), {"publish": staticmethod(slow_publish)})()
    slow.connect = publisher.connect
    slow.close = publisher.close
    relay.publisher = slow
    relay._store.claim = watched_claim  # type: ignore[method-assign]
    write(engine, outbox, [("t", i, f"k{i}") for i in range(10)])
    async with running_relay(relay):
        await wait_until(lambda: len(broker.messages()) == 11, within=15)
        assert overlapped == []  # partial batches: no claim during a publish
        # The late row went out in the very next batch, not one batch later.
        assert [m.payload for m in broker.messages()][-1] == "late"
        write(engine, outbox, [("t", i, f"b{i}") for i in range(200)])
        await wait_until(lambda: len(broker.messages()) == 211, within=15)
    assert set(overlapped) == {50}  # read ahead, and only behind full batches


async def test_only_the_marks_skip_the_wal_flush_wait(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """Marks commit with synchronous_commit off (a crash of PostgreSQL can only undo the
    last marks: their rows are published again); claims and leases keep the default."""
    broker = MemoryBroker()
    relay = Relay(settings, broker.publisher())
    write(engine, outbox, [("t", 1, "k")])
    async with running_relay(relay):
        await wait_until(
            lambda: all(r.status == "published" for r in outbox_rows(engine, tables)), within=15
        )
        show = "SELECT current_setting('synchronous_commit')"
        assert await relay._mark_connection.fetch(show, {}) == [("off",)]
        assert await relay._work_connection.fetch(show, {}) == [("on",)]
        assert await relay._lease_connection.fetch(show, {}) == [("on",)]


async def test_the_heartbeat_outlives_an_unexpected_error(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    relay = Relay(settings, broker.publisher())
    real_heartbeat = relay.leases.heartbeat
    failures = 0

    async def failing_once(*args: Any, **kwargs: Any) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise psycopg.errors.ReadOnlySqlTransaction("simulated failover to a standby")
        await real_heartbeat(*args, **kwargs)

    relay.leases.heartbeat = failing_once  # type: ignore[method-assign]
    async with running_relay(relay):
        write(engine, outbox, [("t", i, None) for i in range(10)])
        await wait_until(lambda: len(broker.messages()) == 10, within=15)
        assert relay.healthy()
    assert failures == 1


async def test_a_new_relay_gets_its_share_while_a_backlog_drains(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    for start in range(0, 6000, 2000):
        write(engine, outbox, [("t", i, f"k{i % 500}") for i in range(start, start + 2000)])
    slow = Settings(**{**settings.__dict__, "relay_batch_size": 20, "relay_id": "relay-a"})
    first = Relay(slow, broker.publisher())
    second = Relay(Settings(**{**slow.__dict__, "relay_id": "relay-b"}), broker.publisher())
    async with running_relay(first):
        await wait_until(lambda: len(first.leases.owned) == PARTITION_COUNT, within=15)
        async with running_relay(second):
            await wait_until(lambda: len(second.leases.owned) == PARTITION_COUNT // 2, within=15)
            pending = sum(r.status == "pending" for r in outbox_rows(engine, tables))
            assert pending > 0, "the backlog drained before the second relay got partitions"
            await wait_until(
                lambda: all(r.status == "published" for r in outbox_rows(engine, tables)), within=15
            )
    for key, sequence in by_key(broker).items():
        deduplicated = list(dict.fromkeys(sequence))
        assert deduplicated == sorted(deduplicated), key


async def claimed_row(
    database_url: str, conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> tuple[OutboxStore, ClaimedRow, uuid.UUID]:
    """One row written and claimed by relay-a: the store, the row, and its claim's token."""
    write(engine, outbox, [("t", 1, "k")])
    leases = PartitionLeases(Connection(conninfo, database_url), tables, "relay-a", 30)
    store = OutboxStore(Connection(conninfo, database_url), tables)
    await leases.heartbeat()
    claim = await store.claim(leases.tokens, limit=10)
    (row,) = claim.rows
    return store, row, claim.tokens[row.partition]


async def test_a_mark_applied_twice_counts_one_failure(
    database_url: str, conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    store, row, token = await claimed_row(database_url, conninfo, engine, outbox, tables)
    rejected = BatchOutcomes.of(
        [RowOutcome(row.position, token, 0, row.due_at, REJECTED, "no", 0.0)]
    )
    first = await store.mark(rejected, max_attempts=2, delete_published=False)
    again = await store.mark(rejected, max_attempts=2, delete_published=False)
    assert [(m.status, m.attempts) for m in first] == [("pending", 1)]
    assert again == []
    (stored,) = outbox_rows(engine, tables)
    assert (stored.status, stored.attempts) == ("pending", 1)


async def test_cancelling_the_relay_releases_its_partitions_and_connections(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker()
    write(engine, outbox, [("t", i, None) for i in range(50)])
    relay = Relay(settings, broker.publisher())
    task = asyncio.create_task(relay.run())
    await wait_until(lambda: len(broker.messages()) == 50, within=15)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert owners(engine, tables) == {None: PARTITION_COUNT}
    with pytest.raises(DatabaseError, match="closed"):
        await relay._mark_connection.get()


async def test_a_retried_mark_cannot_undo_an_operators_replay(
    database_url: str, conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """A mark re-run after a lost reply must not mark a row an operator replayed meanwhile."""
    store, row, token = await claimed_row(database_url, conninfo, engine, outbox, tables)
    confirmed = BatchOutcomes.of([RowOutcome(row.position, token, 0, row.due_at, CONFIRMED)])
    assert len(await store.mark(confirmed, max_attempts=3, delete_published=False)) == 1
    # `postroom outbox replay`: back to pending with the same id, due now.
    with engine.begin() as connection:
        connection.execute(
            update(tables.outbox).values(
                status="pending", attempts=0, next_attempt_at=text("now()"), published_at=None
            )
        )
    assert await store.mark(confirmed, max_attempts=3, delete_published=False) == []
    (stored,) = outbox_rows(engine, tables)
    assert (stored.status, stored.published_at) == ("pending", None)


async def test_a_delayed_message_does_not_look_stuck(
    database_url: str, conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    with Session(engine) as session:
        outbox.enqueue(session, "t", "later", delay=timedelta(hours=1))
        session.commit()
    with engine.begin() as connection:  # written an hour ago, due an hour from now
        connection.execute(
            update(tables.outbox).values(created_at=text("now() - interval '1 hour'"))
        )
    store = OutboxStore(Connection(conninfo, database_url), tables)
    pending, oldest, dead = await store.backlog()
    assert (pending, dead) == (1, 0)
    assert oldest == 0.0
