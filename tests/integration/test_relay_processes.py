"""The relay as users run it: ``postroom relay`` processes against real PostgreSQL and brokers.

Every test writes through the public Outbox into a schema of its own, runs real relay
processes, breaks something for real (SIGKILL, SIGSTOP, a cut TCP path, a killed broker,
terminated database backends) and then checks, with the brokers' own clients and with the
outbox table, that the promises held: nothing lost, nothing marked that was not confirmed,
no attempt burnt by an outage, each key in order, duplicates only as exact copies.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.outbox import Outbox
from postroom.schema import PARTITION_COUNT, Tables
from postroom.schema.sql import quoted_table
from tests.support.network import address
from tests.support.processes import RelayFleet, ServiceProcess, TansuBroker
from tests.support.proxy import FaultProxy
from tests.support.readback import (
    Delivered,
    KafkaReadback,
    RabbitMQReadback,
    check_deliveries,
)
from tests.support.waiting import wait_until
from tests.support.writing import PacedWriter, Written, commit, make_message

pytestmark = pytest.mark.timeout(150)


# ----------------------------------------------------------------------------- services


@pytest.fixture
def relays(database_url: str, tables: Tables, tmp_path: Path) -> Iterator[RelayFleet]:
    """Relay processes on this test's schema; all killed at teardown (before the schema goes)."""
    assert tables.schema is not None
    with RelayFleet(database_url, schema=tables.schema, log_dir=tmp_path / "relays") as fleet:
        yield fleet


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses (topics are ``<prefix>.<name>``)."""
    return f"t{uuid.uuid4().hex[:12]}"


@dataclass
class Scene:
    """What every test here works with: relay processes on its own tables, and a topic prefix."""

    relays: RelayFleet
    tables: Tables
    engine: Engine
    outbox: Outbox
    prefix: str
    record_property: Any

    def parts(self) -> tuple[RelayFleet, Tables, Engine, Outbox, str]:
        return self.relays, self.tables, self.engine, self.outbox, self.prefix


@pytest.fixture
def scene(
    relays: RelayFleet,
    tables: Tables,
    engine: Engine,
    outbox: Outbox,
    prefix: str,
    record_property: Any,
) -> Scene:
    return Scene(relays, tables, engine, outbox, prefix, record_property)


@pytest.fixture
def proxy(rabbitmq: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of RabbitMQ."""
    with FaultProxy(*address(rabbitmq, 5672), lifetime=300) as running:
        yield running


# ----------------------------------------------------------------------------- the table


def outbox_rows(engine: Engine, tables: Tables) -> dict[str, dict[str, Any]]:
    """Every outbox row by message id."""
    sql = text(
        "SELECT id, position, partition, topic, status, attempts, published_at, last_error "
        f"FROM {quoted_table(tables.outbox)}"
    )
    with engine.connect() as connection:
        return {str(row.id): dict(row._mapping) for row in connection.execute(sql)}


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(sql), params).scalar()


def unpublished(engine: Engine, tables: Tables) -> int:
    return int(
        scalar(
            engine,
            f"SELECT count(*) FROM {quoted_table(tables.outbox)} WHERE status <> 'published'",
        )
    )


async def wait_all_published(
    engine: Engine, tables: Tables, within: float, fleet: RelayFleet
) -> None:
    left: list[int] = []

    async def all_published() -> bool:
        left.append(await asyncio.to_thread(unpublished, engine, tables))
        return left[-1] == 0

    await wait_until(
        all_published,
        within=within,
        interval=0.1,
        what="every outbox row published",
        detail=lambda: f"{left[-1]} outbox rows still not published\n{fleet.tails()}",
    )


def assert_published_once_without_attempts(
    engine: Engine, tables: Tables, written: Written
) -> dict[str, dict[str, Any]]:
    """Every written message has exactly one row, published, that never counted an attempt."""
    rows = outbox_rows(engine, tables)
    assert set(rows) == written.ids(), "the outbox holds other rows than the ones written"
    wrong = {i: (r["status"], r["attempts"]) for i, r in rows.items() if r["status"] != "published"}
    assert not wrong, f"{len(wrong)} rows not published: {list(wrong.items())[:5]}"
    burnt = {i: (r["attempts"], r["last_error"]) for i, r in rows.items() if r["attempts"] != 0}
    assert not burnt, f"{len(burnt)} rows counted failed attempts: {list(burnt.items())[:5]}"
    return rows


def report(record_property: Any, name: str, delivered: Sequence[Delivered], summary: str) -> None:
    record_property(f"{name}_deliveries", len(delivered))
    record_property(f"{name}_summary", summary)
    print(f"\n[{name}] {summary}")


# ----------------------------------------------------------------------------- 1. many


@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
async def test_ten_thousand_keyed_messages_arrive_exactly_with_three_relays_and_one_killed(
    broker: str, request: pytest.FixtureRequest, scene: Scene
) -> None:
    relays, tables, engine, outbox, prefix = scene.parts()
    keys = [f"customer-{i:03d}" for i in range(200)]
    topic_of = {key: f"{prefix}.{'orders' if i % 2 else 'payments'}" for i, key in enumerate(keys)}
    topics = sorted(set(topic_of.values()))
    per_key = 50
    writers = 4

    readback: RabbitMQReadback | KafkaReadback
    killed = threading.Event()
    if broker == "rabbitmq":
        broker_url = request.getfixturevalue("rabbitmq")
        readback = await RabbitMQReadback(broker_url, f"{prefix}.#").start()
    else:
        bootstrap = request.getfixturevalue("kafka")
        broker_url = f"kafka://{bootstrap}"
        readback = await asyncio.to_thread(KafkaReadback(bootstrap, topics, partitions=4).start)
    try:
        fleet = [relays.start(broker_url=broker_url, lease=3, batch_size=500) for _ in range(3)]
        for relay in fleet:
            await relay.wait_ready_async()
        await wait_balanced(engine, tables, fleet)

        # 100 transactions of 100 rows from 4 threads; each thread owns 50 keys, so each
        # key's numbers follow its commit order.
        written = Written()
        rounds = per_key // 2

        def write(thread: int) -> None:
            own = keys[thread::writers]
            for round_ in range(rounds):
                if round_ == rounds * 4 // 5:
                    # The last fifth is written after the kill, so rows of the killed
                    # relay's partitions are still to publish whatever the timing.
                    killed.wait(timeout=90)
                batch, numbers = [], []
                for key in own:
                    for number in (2 * round_, 2 * round_ + 1):
                        batch.append(make_message(outbox, topic_of[key], key, number))
                        numbers.append(number)
                commit(engine, outbox, batch)
                written.add(batch, numbers)
                time.sleep(0.02)

        writing = asyncio.gather(*(asyncio.to_thread(write, t) for t in range(writers)))
        total = len(keys) * per_key

        # Kill one relay (SIGKILL: no mark, no release) once ~30% arrived.
        victim, survivors = fleet[0], fleet[1:]
        marks = {relay.relay_id: relay.mark() for relay in survivors}
        await wait_until(
            lambda: readback.count >= total * 3 // 10,
            within=60,
            interval=0.01,
            what="30% of the messages",
            detail=lambda: f"only {readback.count} arrived\n{relays.tails()}",
        )
        victim.kill()
        killed_at = scalar(engine, "SELECT now()")
        killed.set()
        held = [
            row[0]
            for row in await asyncio.to_thread(
                _fetch,
                engine,
                f"SELECT partition FROM {quoted_table(tables.partitions)} WHERE owner = :owner",
                owner=victim.relay_id,
            )
        ]
        assert held, "the killed relay held no partitions: the kill proved nothing"
        await writing
        assert len(written.messages) == total

        # Its partitions move to the survivors once its leases run out, and they publish all.
        for relay in survivors:
            await relay.wait_for_async(
                "relay.partitions_changed",
                after=marks[relay.relay_id],
                where=lambda e: e.get("gained", 0) > 0,
                within=30,
            )
        await readback.wait_for_ids(written.ids(), within=90)
        await wait_all_published(engine, tables, 30, relays)
        delivered = readback.received
    finally:
        killed.set()  # never leave the writers waiting
        await _close(readback)

    result = check_deliveries(
        written.messages, delivered, sequence=written.seq, kafka=broker == "kafka"
    )
    report(scene.record_property, broker, delivered, result.summary())
    result.assert_exact()
    assert result.distinct == total

    rows = assert_published_once_without_attempts(engine, tables, written)
    taken_over = [
        r for r in rows.values() if r["partition"] in held and r["published_at"] > killed_at
    ]
    assert taken_over, "no row of the killed relay's partitions was published after the kill"
    for relay in survivors:
        assert relay.alive, relay.tail()
        assert relay.terminate() == 0, relay.tail()
    owners = _fetch(engine, f"SELECT owner FROM {quoted_table(tables.partitions)}")
    assert all(owner is None for (owner,) in owners), "a clean exit must release its partitions"


async def wait_balanced(engine: Engine, tables: Tables, fleet: Sequence[ServiceProcess]) -> None:
    """Wait until every relay of ``fleet`` owns a fair share of the partitions."""
    wanted = {relay.relay_id for relay in fleet}
    sql = f"SELECT owner, count(*) FROM {quoted_table(tables.partitions)} GROUP BY owner"
    shares: dict[str, int] = {}

    async def balanced() -> bool:
        shares.clear()
        shares.update(await asyncio.to_thread(_fetch, engine, sql))
        return set(shares) == wanted and max(shares.values()) <= -(-PARTITION_COUNT // len(fleet))

    await wait_until(
        balanced,
        within=20,
        interval=0.1,
        what="partitions balanced",
        detail=lambda: f"partitions never balanced: {shares}",
    )


def _fetch(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(text(sql), params))


async def _close(readback: RabbitMQReadback | KafkaReadback) -> None:
    if isinstance(readback, RabbitMQReadback):
        await readback.close()
    else:
        await asyncio.to_thread(readback.close)


# ----------------------------------------------------------------------------- 2. fencing


async def test_stalled_relay_is_fenced_and_changes_nothing_another_relay_took_over(
    rabbitmq: str, proxy: FaultProxy, scene: Scene
) -> None:
    relays, tables, engine, outbox, prefix = scene.parts()
    topic = f"{prefix}.fenced"
    async with RabbitMQReadback(rabbitmq, f"{prefix}.#") as readback:
        # The stale relay publishes through a slow path: each round of a batch waits ~2 s
        # for its confirms, so it can be frozen with publishes sent and unconfirmed.
        stale = relays.start(broker_url=proxy.url_for(rabbitmq), lease=3, batch_size=40)
        await stale.wait_ready_async()
        await stale.wait_for_async("connected")
        proxy.slow(1.0)

        writer = PacedWriter(engine, outbox, topic, keys=20, rows_per_transaction=40)
        for _ in range(5):
            writer.write_once()
        written = writer.written

        # Freeze it while its publishes are in the proxy: it cannot have marked them.
        await wait_until(
            lambda: proxy.in_transit_to_upstream > 0,
            within=20,
            interval=0.002,
            what="the relay publishing",
            detail=stale.tail,
        )
        stale.pause()
        await asyncio.sleep(0.3)  # a statement it already sent completes server-side
        lease_end = scalar(
            engine,
            f"SELECT max(lease_expires_at) FROM {quoted_table(tables.partitions)} "
            "WHERE owner = :owner",
            owner=stale.relay_id,
        )
        assert lease_end is not None, "the frozen relay held no partitions"
        waiting = {i for i, r in outbox_rows(engine, tables).items() if r["status"] == "pending"}
        assert waiting, "the frozen relay had nothing in flight"

        other = relays.start(broker_url=rabbitmq, lease=3, batch_size=40)
        await other.wait_for_async(
            "relay.partitions_changed", where=lambda e: e.get("owned") == PARTITION_COUNT, within=30
        )
        await wait_all_published(engine, tables, 30, relays)
        assert stale.alive
        before = await asyncio.to_thread(outbox_rows, engine, tables)

        # Every row that was waiting when the relay froze was published by the other
        # relay after the frozen relay's lease had ended, without counting an attempt.
        for message_id in waiting:
            row = before[message_id]
            assert row["attempts"] == 0
            assert row["published_at"] > lease_end, (
                f"row {message_id} was marked at {row['published_at']}, before the frozen "
                f"relay's lease ended at {lease_end}"
            )

        # Thawed, it gets the confirms of its stale batch: its marks must be fenced off.
        mark = stale.mark()
        stale.resume()
        fenced = await stale.wait_for_async("relay.mark_fenced", after=mark, within=30)
        assert 0 < fenced["rows"] <= len(waiting), fenced
        await asyncio.sleep(1.5)  # it heartbeats and rebalances; it must change nothing
        after = await asyncio.to_thread(outbox_rows, engine, tables)
        changed = {
            i: (before[i]["published_at"], after[i]["published_at"])
            for i in before
            if (before[i]["status"], before[i]["attempts"], before[i]["published_at"])
            != (after[i]["status"], after[i]["attempts"], after[i]["published_at"])
        }
        assert not changed, f"the fenced relay changed {len(changed)} rows: {changed}"
        assert stale.alive, stale.tail()

        await readback.wait_for_ids(written.ids(), within=30)
        await asyncio.sleep(0.5)  # late copies from the thawed relay, if any
        delivered = readback.received

    result = check_deliveries(written.messages, delivered, sequence=written.seq)
    report(scene.record_property, "fencing", delivered, result.summary())
    result.assert_exact()
    # The frozen batch had reached RabbitMQ through the proxy and was published again by
    # the relay that took over: at-least-once, never at-most-once.
    assert result.duplicates >= 1
    assert_published_once_without_attempts(engine, tables, written)
    assert stale.terminate() == 0
    assert other.terminate() == 0


# ----------------------------------------------------------------------------- 3. outage


async def test_rabbitmq_outage_loses_nothing_burns_no_attempt_and_heals_itself(
    rabbitmq: str, proxy: FaultProxy, scene: Scene
) -> None:
    relays, tables, engine, outbox, prefix = scene.parts()
    topic = f"{prefix}.outage"
    async with RabbitMQReadback(rabbitmq, f"{prefix}.#") as readback:
        relay = relays.start(broker_url=proxy.url_for(rabbitmq), lease=5)
        pid = relay.pid
        await relay.wait_ready_async()
        await relay.wait_for_async("connected")

        writer = PacedWriter(engine, outbox, topic).start()
        try:
            await readback.wait_for(50, within=20)
            mark = relay.mark()
            proxy.cut()
            await relay.wait_for_async("relay.broker_unavailable", after=mark, within=10)
            await asyncio.sleep(4)
            stuck = await asyncio.to_thread(unpublished, engine, tables)
            assert stuck > 0, "rows were written during the outage, so some must wait"
            proxy.restore()
            await asyncio.sleep(1.5)
        finally:
            written = writer.stop()

        await readback.wait_for_ids(written.ids(), within=60)
        await relay.wait_for_async("relay.broker_reconnected", after=mark, within=5)
        await wait_all_published(engine, tables, 20, relays)
        delivered = readback.received

    assert relay.alive, relay.tail()
    assert relay.pid == pid, "the relay must heal without a restart"
    result = check_deliveries(written.messages, delivered, sequence=written.seq)
    report(scene.record_property, "rabbitmq_outage", delivered, result.summary())
    result.assert_exact()
    assert_published_once_without_attempts(engine, tables, written)
    assert relay.terminate() == 0


@pytest.mark.slow  # ~35 s: Tansu forgets producer ids, so the relay waits out message.timeout.ms
async def test_kafka_broker_killed_and_restarted_loses_nothing_and_burns_no_attempt(
    tansu: str, scene: Scene, tmp_path: Path
) -> None:
    relays, tables, engine, outbox, prefix = scene.parts()
    before, during, after = (f"{prefix}.{phase}" for phase in ("before", "during", "after"))
    with TansuBroker(tansu, log_path=tmp_path / "tansu.log") as broker:
        relay = relays.start(broker_url=broker.url, lease=5)
        pid = relay.pid
        await relay.wait_ready_async()

        # Before: everything arrives (then the broker forgets it when it dies).
        writer = PacedWriter(engine, outbox, before)
        with KafkaReadback(broker.bootstrap, [before]) as first:
            for _ in range(10):
                writer.write_once()
            await first.wait_for_ids(writer.written.ids(before), within=30)

        # During: the broker is gone while transactions keep committing.
        mark = relay.mark()
        broker.kill()
        writer.topic = during
        writer.start()
        await asyncio.sleep(4)
        published_while_down = int(
            scalar(
                engine,
                f"SELECT count(*) FROM {quoted_table(tables.outbox)} "
                "WHERE topic = :topic AND status = 'published'",
                topic=during,
            )
        )
        assert published_while_down == 0, "rows were marked published while the broker was down"

        # After: the same port again, an empty broker; the relay carries on by itself.
        broker.start()
        writer.topic = after
        await asyncio.sleep(1.5)
        written = writer.stop()
        with KafkaReadback(broker.bootstrap, [during, after]) as second:
            await second.wait_for_ids(written.ids(during) | written.ids(after), within=90)
            await wait_all_published(engine, tables, 20, relays)
            delivered = second.received

    assert relay.alive, relay.tail()
    assert relay.pid == pid, "the relay must heal without a restart"
    noticed = [e for e in relay.events(after=mark) if e.get("level") in {"warning", "error"}]
    assert noticed, "the relay logged nothing about the outage"
    result = check_deliveries(
        written.of([during, after]), delivered, sequence=written.seq, kafka=True
    )
    report(scene.record_property, "kafka_outage", delivered, result.summary())
    result.assert_exact()
    assert_published_once_without_attempts(engine, tables, written)
    assert relay.terminate() == 0


# ----------------------------------------------------------------------------- 4. latency


async def test_idle_relay_publishes_a_commit_at_once_on_notify_and_by_polling_without(
    rabbitmq: str, scene: Scene
) -> None:
    relays, tables, engine, _, prefix = scene.parts()
    poll = 5.0
    topic = f"{prefix}.idle"
    notifying, silent = Outbox(tables), Outbox(tables, notify=False)
    async with RabbitMQReadback(rabbitmq, f"{prefix}.#") as readback:
        relay = relays.start(broker_url=rabbitmq, poll_interval=poll)
        await relay.wait_ready_async()
        await relay.wait_for_async("wakeup.listening")
        await relay.wait_for_async("connected")

        async def latency(outbox: Outbox, number: int) -> float:
            message = make_message(outbox, topic, "idle-key", number)
            await asyncio.sleep(1.0)  # the relay found nothing and sleeps on its poll
            await asyncio.to_thread(commit, engine, outbox, [message])
            committed = time.monotonic()
            delivered = await readback.wait_for_ids([str(message.id)], within=2 * poll)
            arrived = next(d.arrived for d in delivered if d.id == str(message.id))
            return arrived - committed

        with_notify = [await latency(notifying, n) for n in range(3)]
        without_notify = await latency(silent, 3)

    scene.record_property("latency_with_notify", with_notify)
    scene.record_property("latency_without_notify", without_notify)
    print(f"\n[idle] with NOTIFY {with_notify}, without {without_notify:.3f}")
    assert max(with_notify) < 1.0, f"NOTIFY did not wake the idle relay: {with_notify}"
    assert without_notify < poll + 2.0, f"polling did not find the row: {without_notify:.2f} s"


# ----------------------------------------------------------------------------- 5. database


async def test_relay_survives_its_database_connections_being_killed(
    rabbitmq: str, scene: Scene
) -> None:
    relays, tables, engine, outbox, prefix = scene.parts()
    topic = f"{prefix}.pgkill"
    terminate = text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = :name AND usename = current_user AND pid <> pg_backend_pid()"
    )
    async with RabbitMQReadback(rabbitmq, f"{prefix}.#") as readback:
        relay = relays.start(broker_url=rabbitmq, lease=5, batch_size=50)
        pid = relay.pid
        await relay.wait_ready_async()
        await relay.wait_for_async("connected")
        mark = relay.mark()

        writer = PacedWriter(engine, outbox, topic, rows_per_transaction=30, interval=0.05)
        writer.start()
        killed = []
        try:
            for _ in range(2):
                await asyncio.sleep(1.0)
                # Its work, lease and LISTEN connections are all back before each kill.
                await wait_backends(engine, relay, at_least=3)
                with engine.begin() as connection:
                    results = connection.execute(terminate, {"name": relay.application_name})
                    killed.append(sum(1 for (ok,) in results if ok))
            await asyncio.sleep(1.0)
        finally:
            written = writer.stop()

        await readback.wait_for_ids(written.ids(), within=60)
        await wait_all_published(engine, tables, 30, relays)
        delivered = readback.received

    assert all(count >= 3 for count in killed), f"backends terminated per round: {killed}"
    assert relay.alive, relay.tail()
    assert relay.pid == pid
    noticed = {e["event"] for e in relay.events(after=mark)}
    assert noticed & {"relay.database_error", "relay.heartbeat_failed", "wakeup.disconnected"}, (
        f"the relay never noticed its connections dying: {sorted(noticed)}"
    )
    result = check_deliveries(written.messages, delivered, sequence=written.seq)
    report(scene.record_property, "pg_kill", delivered, result.summary())
    result.assert_exact()
    assert_published_once_without_attempts(engine, tables, written)

    # Connections cut once more, then SIGTERM: the clean exit still hands its partitions
    # back (reconnecting), so another relay need not wait for the lease to run out.
    await wait_backends(engine, relay, at_least=3)
    with engine.begin() as connection:
        connection.execute(terminate, {"name": relay.application_name})
    assert relay.terminate() == 0
    held = _fetch(
        engine,
        f"SELECT partition FROM {quoted_table(tables.partitions)} WHERE owner = :owner",
        owner=relay.relay_id,
    )
    assert not held, f"after SIGTERM the relay still holds {len(held)} partitions\n{relay.tail(5)}"


async def wait_backends(engine: Engine, relay: ServiceProcess, *, at_least: int) -> None:
    """Wait until ``relay`` has ``at_least`` connections to PostgreSQL."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
    counts: list[int] = []

    async def enough() -> bool:
        counts.append(await asyncio.to_thread(scalar, engine, sql, name=relay.application_name))
        return counts[-1] >= at_least

    await wait_until(
        enough,
        within=15,
        what=f"{at_least} connections",
        detail=lambda: f"relay has {counts[-1]} connections\n{relay.tail()}",
    )
