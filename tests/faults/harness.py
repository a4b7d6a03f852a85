"""The fault suite's harness: one run = real relays and consumers, a writer, a fault, a verdict.

A :class:`Run` owns everything of one scenario on one broker: a schema of its own (the
``tables`` fixture), an effects table the consumer's handler writes (each row numbered
from a sequence in the handler's transaction, the order effects were applied in), a
read-back of the scenario's topic with the broker's own client, ``postroom relay`` and
``postroom consume`` processes (:class:`~tests.support.processes.RelayFleet`) and a
:class:`~tests.support.writing.PacedWriter` committing keyed messages. The scenario breaks
things while the writer writes and counts the faults it caused; :meth:`Run.finish` stops
the writer, settles (:mod:`tests.faults.settling`: drained, nothing held by the broker,
effects and deliveries quiet for longer than the redelivery window), then judges the
run's :class:`~tests.faults.checks.History` (:func:`~tests.faults.checks.judge`: loss,
double applies, order on the wire and of late commits, effect order on Kafka, content,
outbox rows, dead rows, rolled-back rows, and every counted fault at least once).

The counts come from a :class:`~tests.faults.profile.Profile`: ``POSTROOM_FAULTS=short``
(the default, for CI) or ``full`` (``make faults``). Every run draws its timing from a
random generator seeded by ``POSTROOM_FAULTS_SEED`` (random when unset) and the scenario's
name, and prints the seed:
``POSTROOM_FAULTS_SEED=<seed> pytest tests/faults -k '<scenario>'`` replays its choices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.schema.sql import quoted_table
from tests.faults.checks import Effect, History, LateCommit, OutboxRow, judge
from tests.faults.profile import PROFILE, SEED
from tests.faults.report import OUTCOMES, Outcome, report_table
from tests.faults.settling import (
    KAFKA_SESSION_TIMEOUT,
    QUIET,
    KafkaLag,
    Snapshot,
    rabbitmq_backlog,
    settle,
)
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import (
    Delivered,
    KafkaReadback,
    RabbitMQReadback,
    create_topics,
    delete_consumer_queues,
    read_kafka_to_end,
)
from tests.support.writing import PacedWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSUMER_TARGET = "tests.faults.app:consumer"
LEASE = 2.0
"""Relay lease in every scenario: short, so a dead or paused relay's partitions move soon."""
KAFKA_CONSUMER_SETTINGS = (
    f"session.timeout.ms={KAFKA_SESSION_TIMEOUT * 1000:.0f}&heartbeat.interval.ms=500"
    "&max.poll.interval.ms=7000&topic.metadata.refresh.interval.ms=1000"
)
"""librdkafka settings of the scenario's consumers: a killed member leaves the group soon."""


# ----------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoints:
    """Where a run's processes and its read-back reach the broker and the database."""

    broker: str
    """``rabbitmq`` or ``kafka``."""
    service_broker_url: str
    """The relays' and consumers' broker URL (through a fault proxy, in some scenarios)."""
    readback: str
    """The read-back's AMQP URL, or its Kafka bootstrap address."""
    service_database_url: str | None = None
    """The relays' and consumers' database URL, when not the test database's own."""

    @property
    def kafka(self) -> bool:
        """True for Kafka."""
        return self.broker == "kafka"

    @property
    def consumer_broker_url(self) -> str:
        """The consumers' broker URL: on Kafka with settings that make group moves quick."""
        if not self.kafka:
            return self.service_broker_url
        joiner = "&" if "?" in self.service_broker_url else "?"
        return self.service_broker_url + joiner + KAFKA_CONSUMER_SETTINGS


# ----------------------------------------------------------------------------- a run


class Run:
    """One scenario on one broker: start services, write, break things, then :meth:`finish`.

    Use as ``async with Run(...) as run:``; leaving it kills every process it started,
    stops the writer and removes the consumer's queues.
    """

    def __init__(
        self,
        *,
        scenario: str,
        endpoints: Endpoints,
        tables: Tables,
        engine: Engine,
        database_url: str,
        log_dir: Path,
        handler_pause: float = 0.02,
        rows_per_transaction: int = 5,
        write_interval: float = 0.05,
        writer: type[PacedWriter] = PacedWriter,
        batch_size: int | None = None,
    ) -> None:
        assert tables.schema is not None
        self.scenario = scenario
        self.endpoints = endpoints
        self.tables = tables
        self.engine = engine
        self.outbox = Outbox(tables)
        self.seed = SEED
        self.rng = random.Random(f"{SEED}:{scenario}:{endpoints.broker}")
        self.topic = f"f{uuid.uuid4().hex[:10]}"
        self.storm_topic = f"{self.topic}.storm"
        self.consumer_name = f"faults-{self.topic}"
        self.effects = f'"{tables.schema}"."effects"'
        self.handler_pause = handler_pause
        self.batch_size = batch_size
        """With a size: the consumers' handler is async and batched, and logs its runs."""
        self.log_dir = log_dir
        self.fleet = RelayFleet(
            endpoints.service_database_url or database_url,
            schema=tables.schema,
            log_dir=log_dir,
            broker_url=endpoints.service_broker_url,
        )
        self.readback: RabbitMQReadback | KafkaReadback | None = None
        self.writer = writer(
            engine,
            self.outbox,
            self.topic,
            keys=20,
            rows_per_transaction=rows_per_transaction,
            interval=write_interval,
            rng=random.Random(self.rng.random()),
        )
        self.outcome = Outcome(scenario, endpoints.broker, SEED, PROFILE.name)
        self.late: list[LateCommit] = []
        """Rows committed late on keys with earlier rows (the long-transaction scenario)."""
        self.faults: dict[str, int] = {}
        self.settle_problems: list[str] = []
        self.settled = False
        """Whether :meth:`settle` ran (:meth:`finish` settles only if not)."""
        self._started = time.monotonic()
        self._writing = False

    async def __aenter__(self) -> Run:
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    f"CREATE TABLE {self.effects} (applied bigserial, message_id text NOT NULL,"
                    " topic text NOT NULL, pid int NOT NULL,"
                    " at timestamptz NOT NULL DEFAULT clock_timestamp())"
                )
            )
        if self.endpoints.kafka:
            bootstrap = self.endpoints.readback
            await asyncio.to_thread(create_topics, bootstrap, [self.topic, self.storm_topic])
            self.readback = await asyncio.to_thread(
                KafkaReadback(bootstrap, [self.topic], create=False).start
            )
        else:
            self.readback = await RabbitMQReadback(self.endpoints.readback, self.topic).start()
        print(f"\n[{self.scenario} / {self.endpoints.broker}] seed {self.seed}, topic {self.topic}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writing:
            self._writing = False
            await asyncio.to_thread(self.writer.stop)
        self.fleet.stop_all()
        if isinstance(self.readback, RabbitMQReadback):
            await self.readback.close()
            await delete_consumer_queues(self.endpoints.readback, self.consumer_name)
        elif self.readback is not None:
            await asyncio.to_thread(self.readback.close)

    # ------------------------------------------------------------ processes

    def start_relay(self, **options: Any) -> ServiceProcess:
        """A relay with the scenario's short lease and backoff (not waited for)."""
        settings: dict[str, Any] = {"lease": LEASE, "backoff_initial": 0.1, "backoff_max": 1.0}
        return self.fleet.start(**{**settings, **options})

    def start_consumer(self) -> ServiceProcess:
        """``postroom consume tests.faults.app:consumer`` for this run (not waited for)."""
        return self.fleet.start_consumer(
            CONSUMER_TARGET,
            broker_url=self.endpoints.consumer_broker_url,
            consumer_id=f"{self.consumer_name}-{len(self.fleet.relays) + 1}",
            extra_args=["--consumer-backoff-initial", "0.1s", "--consumer-backoff-max", "1s"],
            env={
                "FAULTS_CONSUMER": self.consumer_name,
                "FAULTS_TOPIC": self.topic,
                "FAULTS_EFFECTS": self.effects,
                "FAULTS_HANDLER_PAUSE": str(self.handler_pause),
                # The suite's own SIGKILLs land mid-handler on purpose, and a message in
                # hand at more than consumer_max_attempts process deaths is dead-lettered
                # by design (the abuse suite proves that); here every kill is the harness's,
                # so no message may be blamed for them.
                "POSTROOM_CONSUMER_MAX_ATTEMPTS": "1000",
                **self._batching(),
            },
            pythonpath=str(REPO_ROOT),
        )

    def _batching(self) -> dict[str, str]:
        if self.batch_size is None:
            return {}
        number = len(self.fleet.relays) + 1
        return {
            "POSTROOM_CONSUMER_BATCH_SIZE": str(self.batch_size),
            "POSTROOM_CONSUMER_BATCH_LINGER": "0.2",
            "FAULTS_RUN_LOG": str(self.log_dir / f"handler-runs-{number}.log"),
        }

    @staticmethod
    def runs_in(process: ServiceProcess, xid: str) -> list[str]:
        """Ids of the messages the batched consumer ``process`` handled in transaction
        ``xid`` (committed or not)."""
        try:
            lines = Path(process.env["FAULTS_RUN_LOG"]).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split()[1] for line in lines if line.split()[0] == xid]

    def effects_kept(self, process: ServiceProcess, ids: list[str]) -> int:
        """Effect rows ``process`` wrote for the messages ``ids`` that are committed."""
        sql = f"SELECT count(*) FROM {self.effects} WHERE pid = :pid AND message_id = ANY(:ids)"
        with self.engine.connect() as connection:
            return int(connection.execute(text(sql), {"pid": process.pid, "ids": ids}).scalar_one())

    async def ready(self, *processes: ServiceProcess, within: float = 45.0) -> None:
        """Wait until each relay owns partitions and each consumer is subscribed."""
        for process in processes:
            await process.wait_ready_async(within)

    async def start(self, *, relays: int = 1, consumers: int = 1) -> list[ServiceProcess]:
        """Start consumers (first: a RabbitMQ queue must exist before anything is published),
        then relays, wait for all of them, then start writing. Returns relays then consumers."""
        started_consumers = [self.start_consumer() for _ in range(consumers)]
        await self.ready(*started_consumers)
        started_relays = [self.start_relay() for _ in range(relays)]
        await self.ready(*started_relays)
        self.writer.start()
        self._writing = True
        return started_relays + started_consumers

    def relays(self) -> list[ServiceProcess]:
        """Relay processes still running."""
        return [p for p in self.fleet.relays if p.kind == "relay" and p.alive]

    def consumers(self) -> list[ServiceProcess]:
        """Consumer processes still running."""
        return [p for p in self.fleet.relays if p.kind == "consumer" and p.alive]

    async def pause(self, low: float, high: float) -> float:
        """Sleep a random time between ``low`` and ``high`` seconds; return it."""
        seconds = self.rng.uniform(low, high)
        await asyncio.sleep(seconds)
        return seconds

    # ------------------------------------------------------------ database

    def scalar(self, sql: str, **params: Any) -> Any:
        """One value from the test database."""
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def unpublished(self) -> int:
        """Outbox rows not yet published."""
        outbox = quoted_table(self.tables.outbox)
        return int(self.scalar(f"SELECT count(*) FROM {outbox} WHERE status <> 'published'"))

    def effect_counts(self) -> Counter[str]:
        """Message id → number of effect rows."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(f"SELECT message_id, count(*) FROM {self.effects} GROUP BY message_id")
            )
            return Counter({message_id: int(count) for message_id, count in rows})

    def backends_running(self, process: ServiceProcess, fragment: str) -> list[int]:
        """Backend pids of ``process`` running a statement whose text has ``fragment``."""
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
            " AND state = 'active' AND strpos(query, :fragment) > 0"
        )
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(sql), {"name": process.application_name, "fragment": fragment}
            )
            return [int(pid) for (pid,) in rows]

    def open_effects(self, process: ServiceProcess) -> list[tuple[int, str]]:
        """(backend pid, transaction id) of ``process``'s transactions that wrote an effect
        row and have not committed: a handler between its write and its commit."""
        sql = (
            "SELECT a.pid, a.backend_xid::text FROM pg_stat_activity a"
            " JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'relation'"
            " AND l.relation = to_regclass(:effects) AND l.mode = 'RowExclusiveLock'"
            " WHERE a.application_name = :name AND a.state = 'idle in transaction'"
            " AND a.backend_xid IS NOT NULL"
        )
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(sql), {"name": process.application_name, "effects": self.effects}
            )
            return [(int(pid), str(xid)) for pid, xid in rows]

    def rolled_back_effect(self, pid: int, xid: str) -> tuple[bool] | None:
        """``(True,)`` if transaction ``xid`` of backend ``pid`` ended without its effect
        row, ``(False,)`` if the row was committed, None while the backend still runs."""
        with self.engine.connect() as connection:
            running = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar()
            if running:
                return None
            kept = connection.execute(
                text(f"SELECT count(*) FROM {self.effects} WHERE xmin = CAST(:xid AS xid)"),
                {"xid": xid},
            ).scalar()
        return (not kept,)

    def terminate_backends(self, processes: Iterable[ServiceProcess]) -> int:
        """``pg_terminate_backend`` every backend of ``processes``; the number terminated."""
        names = [p.application_name for p in processes]
        with self.engine.connect() as connection:
            terminated = connection.execute(
                text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE application_name = ANY(:names)"
                ),
                {"names": names},
            ).scalar()
        return int(terminated or 0)

    # ------------------------------------------------------------ the verdict

    def seen_on_wire(self) -> set[str]:
        """Ids the read-back received so far."""
        assert self.readback is not None
        return self.readback.ids()

    async def finish(self, *, count: int, faults: dict[str, int], note: str = "") -> Outcome:
        """Settle, check every message and that each of ``faults`` (what the scenario did
        and what it caused, by name) happened at least once, record the outcome (``count``
        faults injected); fail if it failed."""
        if not self.settled:
            await self.settle()
        self.faults = faults
        outcome = await asyncio.to_thread(self.check)
        outcome.faults = count
        counts = ", ".join(f"{n} {name}" for name, n in faults.items())
        outcome.fault_note = f"{counts}; {note}" if note else counts
        OUTCOMES.append(outcome)
        print(report_table([outcome]))
        assert outcome.passed, (
            f"{self.scenario} on {self.endpoints.broker} (seed {self.seed}): "
            f"lost {outcome.lost}, applied twice {outcome.applied_twice}, order violations "
            f"{outcome.order_violations}, problems: {outcome.problems}\n{self.fleet.tails(25)}"
        )
        return outcome

    async def settle(self, *, stall: float | None = None) -> None:
        """Stop writing, then wait until nothing can still arrive (see
        :mod:`tests.faults.settling`); a stall (no progress for ``stall`` seconds, the
        profile's drain time by default) is recorded as a problem."""
        if self._writing:
            self._writing = False
            await asyncio.to_thread(self.writer.stop)
        lag = None
        if self.endpoints.kafka:
            topics = [self.topic, self.storm_topic]
            lag = await asyncio.to_thread(
                KafkaLag, self.endpoints.readback, self.consumer_name, topics
            )
        try:
            failure = await settle(
                lambda: self.snapshot(lag),
                quiet=QUIET[self.endpoints.broker],
                stall=PROFILE.drain if stall is None else stall,
            )
        finally:
            if lag is not None:
                await asyncio.to_thread(lag.close)
        if failure is not None and self.endpoints.kafka and await self._only_unread(failure):
            failure = None
        if failure is not None:
            self.settle_problems.append(failure)
        self.settled = True

    def snapshot(self, lag: KafkaLag | None) -> Snapshot:
        """Where the run stands: the drain's counts, the broker's backlog, the totals."""
        assert self.readback is not None
        committed = self.writer.written.ids()
        delivered = self.readback.received
        if lag is not None:
            floors: dict[tuple[str, int], int] = {}
            for item in delivered:
                place = (item.topic, int(item.extra["partition"]))
                floors[place] = max(floors.get(place, 0), int(item.extra["offset"]) + 1)
            backlog = lag.backlog(floors)
        else:
            backlog = rabbitmq_backlog(self.consumer_name)
        effects = self.effect_counts()
        return Snapshot(
            unpublished=self.unpublished(),
            off_wire=len(committed - {d.id for d in delivered}),
            unhandled=len(committed - set(effects)),
            backlog=backlog,
            effects=sum(effects.values()),
            deliveries=len(delivered),
        )

    def history(self) -> History:
        """What the run recorded, for :func:`~tests.faults.checks.judge`."""
        assert self.readback is not None
        written = self.writer.written
        with written.lock:
            messages, sequence = list(written.messages), dict(written.sequence)
        outbox = quoted_table(self.tables.outbox)
        with self.engine.connect() as connection:
            rows = connection.execute(text(f"SELECT id, status, position FROM {outbox}"))
            outbox_rows = {str(i): OutboxRow(status, int(p)) for i, status, p in rows}
            effects = [
                Effect(int(applied), message_id, topic)
                for applied, message_id, topic in connection.execute(
                    text(f"SELECT applied, message_id, topic FROM {self.effects}")
                )
            ]
        delivered = self.readback.received
        if self.endpoints.kafka and {str(m.id) for m in messages} - {d.id for d in delivered}:
            delivered = self.reread(delivered)
        return History(
            kafka=self.endpoints.kafka,
            topic=self.topic,
            written=messages,
            sequence=sequence,
            rolled_back=self.writer.rolled_back.ids(),
            outbox=outbox_rows,
            delivered=delivered,
            effects=effects,
            late=list(self.late),
            faults=dict(self.faults),
        )

    async def _only_unread(self, failure: str) -> bool:
        """Whether a stalled Kafka drain stalled only in the live read-back: everything was
        published and handled, and a full re-read of the topic finds every committed id on
        the wire (the drain's "not on the wire" counts what the live reader saw)."""
        committed = self.writer.written.ids()
        unpublished = await asyncio.to_thread(self.unpublished)
        effects = await asyncio.to_thread(self.effect_counts)
        if unpublished or committed - set(effects):
            return False
        again = await asyncio.to_thread(read_kafka_to_end, self.endpoints.readback, [self.topic])
        unread = committed - {d.id for d in again}
        print(f"[{self.scenario} / kafka] {failure}; a full re-read finds {len(unread)} missing")
        return not unread

    def reread(self, delivered: list[Delivered]) -> list[Delivered]:
        """The topic read again from its start: the live read-back missed ids (its fetch
        raced a write, or it stopped), and what is on the wire is judged on a full read."""
        assert isinstance(self.readback, KafkaReadback)
        failure = self.readback.failure()
        again = read_kafka_to_end(self.endpoints.readback, [self.topic])
        found = len({d.id for d in again} - {d.id for d in delivered})
        print(
            f"[{self.scenario} / kafka] read-back missed {found} ids that a full re-read found"
            + (f" (it had failed: {failure!r})" if failure else "")
        )
        return again

    def check(self, history: History | None = None) -> Outcome:
        """Judge the run's history (or ``history``, as the self-test tampered with it):
        a new outcome each time, also kept as :attr:`outcome`."""
        outcome = self.outcome = dataclasses.replace(self.outcome, problems=[])
        outcome.seconds = time.monotonic() - self._started
        history = history or self.history()
        verdict = judge(history)
        outcome.messages = len(history.written)
        outcome.lost = verdict.lost
        outcome.wire_duplicates = verdict.wire_duplicates
        outcome.applied_twice = verdict.applied_twice
        outcome.order_violations = verdict.order_violations
        outcome.inbox_skips = sum(
            len(p.events("consumer.duplicate")) for p in self.fleet.relays if p.kind == "consumer"
        )
        outcome.problems = [*self.settle_problems, *verdict.problems]
        return outcome


#: The ``make_run`` fixture: ``make_run(scenario, endpoints, **options)`` builds a :class:`Run`.
RunFactory = Callable[..., Run]
#: The ``endpoints`` fixture: ``endpoints(broker)``, a broker's :class:`Endpoints` (no proxy).
Direct = Callable[[str], Endpoints]
