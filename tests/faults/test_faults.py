"""The proof under faults: eight ways of breaking postroom, on RabbitMQ and on Kafka.

Each test is one scenario on one broker, run by a :class:`~tests.faults.harness.Run`: real
``postroom relay`` and ``postroom consume`` processes, a writer committing keyed messages
all along, faults at random moments (seeded; the seed is printed), then a check of every
committed message: delivered to the broker, handled exactly once, each key in order.
``POSTROOM_FAULTS=full`` (``make faults``) runs the full counts; the default is the short
profile CI runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from postroom.brokers import publisher_from_url
from postroom.message import Message
from postroom.schema.sql import quoted_table
from tests.faults.checks import LateCommit
from tests.faults.harness import LEASE, Direct, Endpoints, Run, RunFactory
from tests.faults.profile import PROFILE
from tests.support.network import address, free_port, replace_address
from tests.support.private_postgres import PrivatePostgres
from tests.support.processes import ServiceProcess, TansuBroker
from tests.support.proxy import FaultProxy
from tests.support.waiting import wait_until
from tests.support.writing import CrashWriter, make_message

BROKERS = ["rabbitmq", "kafka"]
CLAIM_FRAGMENT = "octet_length(o.payload)"
"""A piece of the relay's claim statement only (``schema/relay_sql.py``), to catch one."""

pytestmark = [pytest.mark.timeout(PROFILE.timeout), pytest.mark.parametrize("broker", BROKERS)]


# ----------------------------------------------------------------------------- 1. relay kills


async def test_relay_killed_at_random_moments(
    broker: str, make_run: RunFactory, endpoints: Direct
) -> None:
    """Two relays under a steady write load; SIGKILL one at a random moment, start another."""
    async with make_run("relay SIGKILL", endpoints(broker)) as run:
        await run.start(relays=2)
        killed = 0
        for _ in range(PROFILE.relay_kills):
            await run.pause(0.3, 2.0)
            victim = run.rng.choice(run.relays())
            victim.kill()
            killed += victim.returncode == -signal.SIGKILL
            run.start_relay()
        await run.finish(count=PROFILE.relay_kills, faults={"relays SIGKILLed": killed})


# ----------------------------------------------------------------------------- 2. paused relays


async def test_relay_paused_past_its_lease(
    broker: str, make_run: RunFactory, endpoints: Direct
) -> None:
    """Three relays; SIGSTOP one for longer than its lease, then SIGCONT it.

    Its partitions move to the others meanwhile; when it wakes, whatever it still holds
    must be fenced (not marked), and whatever it publishes late is only a duplicate.
    """
    # A heavier load than elsewhere, so that a pause often lands in the middle of a batch.
    heavy = {"rows_per_transaction": 10, "write_interval": 0.02, "handler_pause": 0.002}
    async with make_run("relay SIGSTOP past lease", endpoints(broker), **heavy) as run:
        await run.start(relays=3)
        pauses = 0
        # Past the profile's pauses, pause on until a batch was fenced (at most 8 more).
        while pauses < PROFILE.pauses or (not _fenced(run) and pauses < PROFILE.pauses + 8):
            await run.pause(0.5, 1.5)
            victim = run.rng.choice(run.relays())
            # Freeze it while it claims, so it wakes with a batch its lease no longer covers.
            with contextlib.suppress(TimeoutError):
                await wait_until(
                    lambda: asyncio.to_thread(run.backends_running, victim, CLAIM_FRAGMENT),
                    within=3.0,
                    interval=0.005,
                    error=TimeoutError,
                )
            victim.pause()
            await run.pause(LEASE + 0.5, LEASE + 3.0)
            victim.resume()
            pauses += 1
            await run.pause(1.0, 1.5)
        faults = {"relays paused past the lease": pauses, "batches fenced": _fenced(run)}
        await run.finish(count=pauses, faults=faults)


def _fenced(run: Run) -> int:
    return sum(len(p.events("relay.mark_fenced")) for p in run.fleet.relays)


# ----------------------------------------------------------------------------- 3. broker outages


async def test_broker_unreachable_then_back(
    broker: str,
    make_run: RunFactory,
    endpoints: Direct,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """Relays and consumers reach the broker through a fault proxy that cuts every
    connection, black-holes them (a partition, healed or ended by a cut) or slows them."""
    direct = endpoints(broker)
    tansu: TansuBroker | None = None
    if broker == "kafka":
        # Kafka clients connect to the address the broker advertises: a private broker
        # advertises the proxy, so every connection (not just the first) goes through it.
        proxy_port = free_port()
        tansu = TansuBroker(
            request.getfixturevalue("tansu"),
            advertised_port=proxy_port,
            log_path=tmp_path / "tansu.log",
        ).start()
        proxy = FaultProxy("127.0.0.1", tansu.port, port=proxy_port, lifetime=3600).start()
        through = Endpoints("kafka", f"kafka://127.0.0.1:{proxy_port}", f"127.0.0.1:{tansu.port}")
    else:
        proxy = FaultProxy(*address(direct.readback, 5672), lifetime=3600).start()
        through = dataclasses.replace(direct, service_broker_url=proxy.url_for(direct.readback))
    modes: list[str] = []
    hit: dict[str, int] = {"cuts": 0, "black holes": 0, "slowdowns": 0}
    try:
        async with make_run("broker outage", through) as run:
            await run.start(relays=2)
            for number in range(PROFILE.broker_outages):
                await run.pause(0.5, 1.5)
                mode = ("cut", "black hole", "slow")[number % 3]
                # Aim at connections: after a cut the services reconnect within seconds
                # (aio-pika waits 5 s), and an outage that finds none tests nothing.
                with contextlib.suppress(TimeoutError):
                    await wait_until(lambda: proxy.active > 0, within=15.0, error=TimeoutError)
                # An outage counts when it caught connections of the services.
                hit[("cuts", "black holes", "slowdowns")[number % 3]] += proxy.active > 0
                if mode == "cut":
                    proxy.cut()
                elif mode == "black hole":
                    proxy.black_hole()
                else:
                    proxy.slow(run.rng.uniform(0.05, 0.3))
                await run.pause(0.5, 3.0)
                if mode == "black hole" and run.rng.random() < 0.5:
                    mode = "black hole, then cut"
                    proxy.cut()
                proxy.restore()
                modes.append(mode)
            note = ", ".join(f"{modes.count(m)} {m}" for m in sorted(set(modes)))
            await run.finish(count=len(modes), faults=hit, note=note)
    finally:
        proxy.close()
        if tansu is not None:
            tansu.ensure_stopped()


# ----------------------------------------------------------------------------- 4. database faults


async def test_database_connections_killed_and_database_unreachable(
    broker: str, make_run: RunFactory, endpoints: Direct, database_url: str
) -> None:
    """Relays and consumers reach PostgreSQL through a fault proxy (the writer does not).

    Faults alternate: every backend of theirs terminated (``pg_terminate_backend``,
    mid-batch and mid-handler under load), and the database cut off for a while.
    """
    proxy = FaultProxy(*address(database_url, 5432), lifetime=3600).start()
    through = dataclasses.replace(
        endpoints(broker),
        service_database_url=replace_address(database_url, proxy.host, proxy.port),
    )
    terminated = cuts = 0
    try:
        async with make_run("database faults", through) as run:
            services = await run.start(relays=2)
            for number in range(PROFILE.database_faults):
                await run.pause(0.5, 1.5)
                if number % 2 == 0:
                    running = run.relays() + run.consumers()
                    terminated += await asyncio.to_thread(run.terminate_backends, running)
                else:
                    cuts += proxy.active > 0  # a cut counts when it caught connections
                    proxy.cut()
                    await run.pause(0.3, 2.5)
                    proxy.restore()
            assert all(p.alive for p in services), run.fleet.tails(25)
            faults = {"backends terminated": terminated, "database cuts": cuts}
            await run.finish(count=PROFILE.database_faults, faults=faults)
    finally:
        proxy.close()


# ----------------------------------------------------------------------------- 5. consumer kills


async def test_consumer_killed_mid_handler(
    broker: str, make_run: RunFactory, endpoints: Direct
) -> None:
    """SIGKILL the consumer while a handler's transaction is open (its effect written, not
    committed), start another; no effect may be lost or applied twice."""
    async with make_run("consumer SIGKILL", endpoints(broker), handler_pause=0.03) as run:
        await _kill_consumers(run, _kill_mid_handler, landed="kills mid-handler")


async def test_consumer_killed_mid_batch(
    broker: str, make_run: RunFactory, endpoints: Direct
) -> None:
    """Batched consumers (async handler, batches of up to 8): SIGKILL one after some
    handlers of a batch ran and before its commit, start another; the whole batch is
    handled again, and no effect may be lost or applied twice."""
    options = {"handler_pause": 0.03, "batch_size": 8}
    async with make_run("consumer SIGKILL mid-batch", endpoints(broker), **options) as run:
        mid_batch = await _kill_consumers(run, _kill_mid_batch, landed="kills mid-batch")
        assert mid_batch, "no kill landed after two handlers of one batch ran"


Kill = Callable[[Run, ServiceProcess], Awaitable[bool]]


async def _kill_consumers(run: Run, kill: Kill, *, landed: str) -> int:
    """Start a relay and a consumer; ``kill`` the consumer and start another, the profile's
    number of times and on until one kill landed where aimed (at most 10 more); check the
    run. The number of kills that landed."""
    await run.start(relays=1)
    kills = hits = 0
    while kills < PROFILE.consumer_kills or (not hits and kills < PROFILE.consumer_kills + 10):
        victim = run.consumers()[0]
        await run.pause(0.2, 1.0)
        hits += await kill(run, victim)
        kills += 1
        run.start_consumer()
    await run.finish(count=kills, faults={"consumers SIGKILLed": kills, landed: hits})
    return hits


async def _kill_when_open(
    run: Run, consumer: ServiceProcess, open_: Callable[[], list[tuple[int, str]]]
) -> tuple[str, bool] | None:
    """SIGKILL ``consumer`` once ``open_()`` names one of its transactions (backend pid,
    xid), or after 20 s. Once that backend ended: the xid, and whether the transaction's
    own effect rows are gone; None if nothing was open."""
    try:
        ((pid, xid), *_) = await wait_until(
            lambda: asyncio.to_thread(open_), within=20.0, interval=0.005, error=TimeoutError
        )
    except TimeoutError:
        consumer.kill()
        return None
    consumer.kill()
    (rolled_back,) = await wait_until(
        lambda: asyncio.to_thread(run.rolled_back_effect, pid, xid),
        within=30.0,
        what=f"the killed consumer's backend {pid} to end",
    )
    return xid, rolled_back


async def _kill_mid_handler(run: Run, consumer: ServiceProcess) -> bool:
    """SIGKILL ``consumer`` once a handler of it wrote its effect and has not committed;
    True if the kill landed there (that transaction then ended without its effect)."""
    killed = await _kill_when_open(run, consumer, lambda: run.open_effects(consumer))
    return killed is not None and killed[1]


async def _kill_mid_batch(run: Run, consumer: ServiceProcess) -> bool:
    """SIGKILL ``consumer`` once two handlers ran in one of its open transactions; True if
    the kill landed there and none of that batch's effects was committed."""

    def batch_open() -> list[tuple[int, str]]:
        found = run.open_effects(consumer)
        return [(pid, xid) for pid, xid in found if len(run.runs_in(consumer, xid)) >= 2]

    killed = await _kill_when_open(run, consumer, batch_open)
    if killed is None:
        return False
    # Every handler of the batch ran in that transaction (perhaps more after the check).
    ids = run.runs_in(consumer, killed[0])
    return await asyncio.to_thread(run.effects_kept, consumer, ids) == 0


# ----------------------------------------------------------------------------- 6. storms


async def test_duplicate_storms(broker: str, make_run: RunFactory, endpoints: Direct) -> None:
    """Messages already delivered arrive again many times at once: exact copies on their
    own topic, and copies under other keys on a twin topic (other partitions on Kafka, so
    the consumer handles copies of one message concurrently)."""
    async with make_run("duplicate storm", endpoints(broker)) as run:
        await run.start(relays=1)
        publisher = publisher_from_url(run.endpoints.service_broker_url)
        await publisher.connect()
        injected = 0
        try:
            for _ in range(PROFILE.storms):
                await run.pause(0.5, 1.5)
                copies = _storm(run, PROFILE.storm_copies)
                chunks = [copies[i::4] for i in range(4)]
                results = await asyncio.gather(*(publisher.publish(c) for c in chunks))
                refused = [r for batch in results for r in batch if not r.confirmed]
                assert not refused, f"the broker refused storm copies: {refused[:3]}"
                injected += len(copies)
        finally:
            await publisher.close()
        await run.finish(count=PROFILE.storms, faults={"copies injected": injected})


def _storm(run: Run, copies: int) -> list[Message]:
    """Copies of up to 20 messages the read-back has already seen (so exact copies on the
    main topic cannot reorder first deliveries), shuffled."""
    seen = run.seen_on_wire()
    delivered = [m for m in run.writer.written.of([run.topic]) if str(m.id) in seen]
    chosen = run.rng.sample(delivered, min(20, len(delivered)))
    storm: list[Message] = []
    for message in chosen:
        storm += [message] * copies
        storm += [
            dataclasses.replace(
                message, topic=run.storm_topic, key=f"storm-{run.rng.randrange(10_000)}"
            )
            for _ in range(copies)
        ]
    run.rng.shuffle(storm)
    return storm


# ----------------------------------------------------------------------------- 7. long transactions


async def test_long_transactions_commit_after_later_rows_were_published(
    broker: str, make_run: RunFactory, endpoints: Direct
) -> None:
    """A transaction enqueues a row on a key whose earlier rows are already on the wire,
    then stays open while later rows are published (and, every other time, a relay is
    killed meanwhile); then it commits, or rolls back (the first always rolls back, the
    second always commits, the others a third of the time). The late row must still be
    published and handled, in its key's order as docs/relay.md promises for late commits;
    a rolled-back one must never appear."""
    later_rows = 50 if PROFILE.name == "full" else 20
    async with make_run("long transaction", endpoints(broker)) as run:
        await run.start(relays=2)
        rolled_back = kills = 0
        for number in range(PROFILE.long_transactions):
            await run.pause(0.2, 0.8)
            key = await _published_key(run)
            message = make_message(run.outbox, run.topic, key, 100_000 + number)
            session = Session(run.engine)
            try:
                session.begin()
                run.outbox.enqueue_many(session, [message])
                position = _position(run, session, message)
                if number % 2 == 1:
                    run.rng.choice(run.relays()).kill()
                    run.start_relay()
                    kills += 1
                await _wait_published_after(run, position, later_rows, within=60.0)
                if number == 0 or (number > 1 and run.rng.random() < 0.3):
                    session.rollback()
                    run.writer.rolled_back.add([message], [0])
                    rolled_back += 1
                else:
                    before = frozenset(run.writer.written.ids())
                    session.commit()
                    visible = await asyncio.to_thread(run.scalar, _max_position(run))
                    run.writer.written.add([message], [-1])
                    run.late.append(
                        LateCommit(str(message.id), key, position, int(visible), before)
                    )
            finally:
                session.close()
        faults = {
            "rolled back": rolled_back,
            "committed late on a published key": len(run.late),
            "relay kills while open": kills,
        }
        await run.finish(count=PROFILE.long_transactions, faults=faults)


async def _published_key(run: Run) -> str:
    """A key of the writer's with rows already on the wire (waits for one)."""

    def keys() -> list[str]:
        seen = run.seen_on_wire()
        return sorted({str(m.key) for m in run.writer.written.of([run.topic]) if str(m.id) in seen})

    found = await wait_until(keys, within=30.0, what="a key with rows on the wire")
    return run.rng.choice(found)


def _max_position(run: Run) -> str:
    return f"SELECT max(position) FROM {quoted_table(run.tables.outbox)}"


def _position(run: Run, session: Session, message: Message) -> int:
    outbox = quoted_table(run.tables.outbox)
    sql = text(f"SELECT position FROM {outbox} WHERE id = :id")
    return int(session.execute(sql, {"id": message.id}).scalar_one())


async def _wait_published_after(run: Run, position: int, rows: int, *, within: float) -> None:
    outbox = quoted_table(run.tables.outbox)
    sql = f"SELECT count(*) FROM {outbox} WHERE position > :p AND status = 'published'"

    async def published() -> bool:
        return bool(await asyncio.to_thread(run.scalar, sql, p=position) >= rows)

    await wait_until(
        published,
        within=within,
        interval=0.1,
        what=f"{rows} rows after position {position} published",
        detail=lambda: run.fleet.tails(20),
    )


# ----------------------------------------------------------------------------- 8. database crashes


async def test_database_crashed_and_restarted(
    broker: str,
    make_private_run: RunFactory,
    private_postgres: PrivatePostgres,
    endpoints: Direct,
) -> None:
    """PostgreSQL itself crashes while writers commit, relays publish and consumers handle:
    the postmaster SIGKILLed (every other time alone, its processes left to quit by
    themselves; otherwise with every server process), alternating with
    ``pg_ctl stop -m immediate``; it stays down a moment, then restarts and recovers.

    The relay's marks commit with ``synchronous_commit = off``, so a crash may undo the
    last of them: their rows go out again, which may only add duplicates. A writer's
    transaction counts once its COMMIT returned; one whose COMMIT died with the server is
    settled by reading the outbox after the restart, and a rolled-back one must never be
    published or applied.
    """
    options = {"writer": CrashWriter, "handler_pause": 0.01}
    async with make_private_run("database crash", endpoints(broker), **options) as run:
        services = await run.start(relays=2)
        crashes: list[str] = []
        restarts = 0
        for number in range(PROFILE.database_crashes):
            await run.pause(1.0, 3.0)
            started = await asyncio.to_thread(run.scalar, "SELECT pg_postmaster_start_time()")
            if number % 2 == 1:
                await asyncio.to_thread(private_postgres.stop_immediate)
                crashes.append("immediate stop")
            else:
                alone = number % 4 == 0
                await asyncio.to_thread(private_postgres.kill, alone=alone)
                crashes.append("SIGKILL postmaster" if alone else "SIGKILL all")
            await run.pause(0.1, 1.5)
            private_postgres.launch()
            await private_postgres.wait_ready_async()
            # A crash counts once a new server (crash recovery done) answers.
            restarted = await asyncio.to_thread(run.scalar, "SELECT pg_postmaster_start_time()")
            restarts += restarted > started
        await run.settle()
        assert all(p.alive for p in services), run.fleet.tails(25)
        writer = run.writer
        assert isinstance(writer, CrashWriter)
        kinds = ", ".join(f"{crashes.count(k)} {k}" for k in sorted(set(crashes)))
        note = (
            f"{kinds}; writer: {writer.failed_before_commit} rolled back, "
            f"{writer.unknown_committed + writer.unknown_rolled_back} COMMITs unknown "
            f"({writer.unknown_committed} found committed)"
        )
        await run.finish(count=len(crashes), faults={"crashes, then restarts": restarts}, note=note)
