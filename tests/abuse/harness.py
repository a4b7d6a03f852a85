"""The abuse suite's stage: one real relay and one real consumer per broker, shared by the
cases, with the checks every case ends with, and the session's report.

A :class:`Stage` owns a schema of its own, three topics (``hostile`` for the case's input,
``other`` for the ordinary traffic written alongside, ``decoy`` for the handler a spoofed
header names), an effects table the consumer (``tests/abuse/app.py``) writes, a
``postroom relay`` and a ``postroom consume`` process, and the secrets planted in their
URLs: a database password (PostgreSQL here trusts local connections, so any password
works), a RabbitMQ user of the session's own with a random password, and a Kafka
``sasl.password`` in the URL's query.

Every case ends with :meth:`Stage.finish`: the processes still run, each one's peak
resident memory (``VmHWM``) is under the case's bound, no line either process wrote
contains a secret, and an :class:`Outcome` row joins the report (printed at the end of the
session and written to ``.abuse/report.json``; ``POSTROOM_ABUSE_REPORT`` names another file).

Profiles: ``POSTROOM_ABUSE=short`` (default, part of ``make test``) or ``full``
(``make abuse``: more repetitions and larger sizes).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.brokers.base import dead_letter_name
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables, build_tables, migrate
from tests.support.consuming import KAFKA_GROUP_SETTINGS, RawMessage, Rig
from tests.support.database import drop_schema, unique_schema
from tests.support.network import free_port, http_get
from tests.support.processes import RelayFleet, ServiceProcess
from tests.support.readback import (
    Delivered,
    KafkaReadback,
    create_topics,
    delete_consumer_queues,
    drain_queue,
)
from tests.support.services import AMQP_URL, KAFKA_BOOTSTRAP
from tests.support.waiting import wait_until_sync

REPO_ROOT = Path(__file__).resolve().parents[2]
CONSUMER_TARGET = "tests.abuse.app:consumer"
BROKERS = ("rabbitmq", "kafka")
MIB = 1024 * 1024
HEALTH_TIMEOUT = 2.0
"""The consumer's and relay's ``POSTROOM_HEALTH_TIMEOUT``: short, so "idle stays healthy"
is proven in seconds."""
CONSUMER_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Profile:
    """How hard the suite pushes."""

    name: str
    others: int
    """Ordinary messages written alongside each case."""
    spellings_rounds: int
    """Times the same-UUID-in-every-spelling case is repeated (fresh UUID each time)."""
    label_flood: int
    """Messages with random topic/header values in the metrics case."""
    many_headers: int
    """Headers on the thousands-of-headers message."""
    big_rows: int
    """Rows of 1 MiB in the byte-budget case."""
    idle_windows: float
    """Health windows an idle service is watched for."""


PROFILES = {
    "short": Profile("short", 20, 1, 2000, 3000, 150, 2.5),
    "full": Profile("full", 100, 5, 5000, 20000, 400, 10.0),
}


def profile_from_env() -> Profile:
    name = os.environ.get("POSTROOM_ABUSE", "short")
    if name not in PROFILES:
        raise RuntimeError(f"POSTROOM_ABUSE must be one of {sorted(PROFILES)}, got {name!r}")
    return PROFILES[name]


PROFILE = profile_from_env()


# ----------------------------------------------------------------------------- the report


@dataclass
class Outcome:
    """One case on one broker, as the report shows it."""

    case: str
    broker: str
    fate: str
    other_traffic: str
    relay_rss_mib: float | None
    consumer_rss_mib: float | None


OUTCOMES: list[Outcome] = []
COLUMNS = ("case", "broker", "fate", "other traffic", "peak RSS MiB (relay / consumer)")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report_table(outcomes: Iterable[Outcome]) -> str:
    """The outcomes as a Markdown table."""
    rows = [
        [
            o.case,
            o.broker,
            o.fate,
            o.other_traffic,
            f"{_mib(o.relay_rss_mib)} / {_mib(o.consumer_rss_mib)}",
        ]
        for o in outcomes
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def write_report(path: Path, outcomes: list[Outcome]) -> None:
    """The session's outcomes as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"profile": PROFILE.name, "cases": [asdict(o) for o in outcomes]}
    path.write_text(json.dumps(document, indent=2) + "\n")


# ----------------------------------------------------------------------------- secrets


@dataclass(frozen=True)
class Secrets:
    """The secret strings planted in the services' URLs, and those URLs."""

    database: str = field(default_factory=lambda: f"dbpw-{secrets.token_hex(8)}")
    amqp_user: str = field(default_factory=lambda: f"abuse-{secrets.token_hex(4)}")
    amqp: str = field(default_factory=lambda: f"amqppw-{secrets.token_hex(8)}")
    kafka: str = field(default_factory=lambda: f"kafkapw-{secrets.token_hex(8)}")
    wrong: str = field(default_factory=lambda: f"wrongpw-{secrets.token_hex(8)}")
    """A wrong password, planted where a case misconfigures a service: also never printed."""

    def all(self) -> tuple[str, ...]:
        return (self.database, self.amqp, self.kafka, self.wrong)

    def database_url(self, plain_url: str) -> str:
        """``plain_url`` with the planted password (the local server trusts, so it works)."""
        scheme, rest = plain_url.split("://", 1)
        user_host = rest.split("@", 1)
        if len(user_host) == 2:
            user = user_host[0].split(":", 1)[0]
            return f"{scheme}://{user}:{self.database}@{user_host[1]}"
        return f"{scheme}://postgres:{self.database}@{rest}"

    def amqp_url(self, password: str | None = None, vhost: str = "") -> str:
        """The RabbitMQ URL of the session's user (``password`` to plant a wrong one)."""
        host = AMQP_URL.split("@", 1)[-1].split("/", 1)[0]
        return f"amqp://{self.amqp_user}:{password or self.amqp}@{host}/{vhost}"

    def kafka_url(self, bootstrap: str = KAFKA_BOOTSTRAP) -> str:
        """The Kafka URL with the planted secret and quick consumer-group timings."""
        return f"kafka://{bootstrap}?{KAFKA_GROUP_SETTINGS}&sasl.password={self.kafka}"


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``rabbitmqctl`` (the suite adds and removes a user of its own)."""
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )


def add_amqp_user(planted: Secrets) -> None:
    """Create the session's RabbitMQ user, allowed everything on ``/``."""
    for args in (
        ("add_user", planted.amqp_user, planted.amqp),
        ("set_permissions", "-p", "/", planted.amqp_user, ".*", ".*", ".*"),
    ):
        done = rabbitmqctl(*args)
        assert done.returncode == 0, f"rabbitmqctl {args[0]} failed: {done.stderr}"


def delete_amqp_user(planted: Secrets) -> None:
    rabbitmqctl("delete_user", planted.amqp_user)


def leaked(lines: Iterable[str], planted: Iterable[str]) -> list[str]:
    """The lines that contain any of the ``planted`` secrets."""
    wanted = [s for s in planted if s]
    return [line for line in lines if any(s in line for s in wanted)]


# ----------------------------------------------------------------------------- the stage


class Stage:
    """One broker's shared relay and consumer, and what a case needs around them."""

    def __init__(
        self, broker: str, *, engine: Engine, database_url: str, planted: Secrets, log_dir: Path
    ) -> None:
        self.broker = broker
        self.engine = engine
        self.planted = planted
        self.plain_database_url = database_url
        self.database_url = planted.database_url(database_url)
        self.schema = unique_schema()
        self.tables: Tables = build_tables(self.schema)
        self.outbox = Outbox(self.tables)
        self.big_outbox = Outbox(self.tables, max_payload_bytes=16 * MIB)
        """An outbox that lets bodies past the 1 MiB default through, to reach the broker's."""
        tag = uuid.uuid4().hex[:8]
        self.consumer_name = f"abuse-{tag}"
        self.topic = f"abuse.{tag}.hostile"
        self.other = f"abuse.{tag}.other"
        self.decoy = f"abuse.{tag}.decoy"
        self.effects = f'"{self.schema}".abuse_effects'
        self.broker_url = planted.amqp_url() if broker == "rabbitmq" else planted.kafka_url()
        self.fleet = RelayFleet(self.database_url, schema=self.schema, log_dir=log_dir)
        self.rig = Rig(broker)
        self.relay: ServiceProcess | None = None
        self.consumer: ServiceProcess | None = None
        self.relay_port = 0
        self.consumer_port = 0
        self._dead: list[Delivered] = []
        self._dead_reader: KafkaReadback | None = None
        self._key = 0

    # ---------------------------------------------------------------- set up, tear down

    def open(self) -> Stage:
        migrate.upgrade(self.plain_database_url, self.tables)
        with self.engine.begin() as connection:
            connection.execute(
                text(
                    f"CREATE TABLE {self.effects} (message_id text NOT NULL, topic text NOT "
                    "NULL, handler text NOT NULL, pid int NOT NULL, body_bytes int NOT NULL)"
                )
            )
        if self.broker == "kafka":
            create_topics(
                KAFKA_BOOTSTRAP,
                [self.topic, self.other, self.decoy, dead_letter_name(self.consumer_name)],
            )
            self._dead_reader = KafkaReadback(
                KAFKA_BOOTSTRAP, [dead_letter_name(self.consumer_name)], create=False
            ).start()
        self.consumer = self.start_consumer()
        self.consumer.wait_ready(within=60)
        self.relay = self.start_relay()
        self.relay.wait_ready(within=60)
        return self

    def close(self) -> None:
        self.fleet.stop_all()
        if self._dead_reader is not None:
            self._dead_reader.close()
        if self.broker == "rabbitmq":
            asyncio.run(delete_consumer_queues(AMQP_URL, self.consumer_name))
        drop_schema(self.engine, self.schema)

    def consumer_env(self) -> dict[str, str]:
        return {
            "ABUSE_CONSUMER": self.consumer_name,
            "ABUSE_TOPIC": self.topic,
            "ABUSE_OTHER": self.other,
            "ABUSE_DECOY": self.decoy,
            "ABUSE_EFFECTS": self.effects,
            "POSTROOM_CONSUMER_MAX_ATTEMPTS": str(CONSUMER_MAX_ATTEMPTS),
            "POSTROOM_CONSUMER_BACKOFF_INITIAL": "0.05",
            "POSTROOM_CONSUMER_BACKOFF_MAX": "0.2",
            "POSTROOM_HEALTH_TIMEOUT": str(HEALTH_TIMEOUT),
        }

    def start_consumer(self, **options: Any) -> ServiceProcess:
        """``postroom consume tests.abuse.app:consumer`` (not waited for)."""
        port = options.pop("metrics_port", None) or free_port()
        if "broker_url" not in options:
            self.consumer_port = port
        env = {**self.consumer_env(), **options.pop("env", {})}
        return self.fleet.start_consumer(
            CONSUMER_TARGET,
            broker_url=options.pop("broker_url", self.broker_url),
            consumer_id=f"{self.consumer_name}-{len(self.fleet.relays) + 1}",
            metrics_port=port,
            env=env,
            pythonpath=str(REPO_ROOT),
            **options,
        )

    def start_relay(self, **options: Any) -> ServiceProcess:
        """``postroom relay`` on the stage's schema, with short leases and backoff."""
        port = options.pop("metrics_port", None) or free_port()
        if "broker_url" not in options:
            self.relay_port = port
        env = {"POSTROOM_HEALTH_TIMEOUT": str(HEALTH_TIMEOUT), **options.pop("env", {})}
        return self.fleet.start(
            broker_url=options.pop("broker_url", self.broker_url),
            lease=3.0,
            poll_interval=0.2,
            backoff_initial=0.2,
            backoff_max=0.5,
            max_attempts=3,
            metrics_port=port,
            env=env,
            **options,
        )

    def restart_relay(self, **options: Any) -> ServiceProcess:
        """Stop the shared relay and start a fresh one (its memory peak starts anew)."""
        assert self.relay is not None
        self.relay.terminate()
        self.relay = self.start_relay(**options)
        self.relay.wait_ready(within=60)
        return self.relay

    def restart_consumer(self) -> ServiceProcess:
        """Start a new shared consumer (after the old one exited or was stopped)."""
        assert self.consumer is not None
        if self.consumer.alive:
            self.consumer.terminate()
        self.consumer = self.start_consumer()
        self.consumer.wait_ready(within=60)
        return self.consumer

    @property
    def services(self) -> tuple[ServiceProcess, ServiceProcess]:
        assert self.relay is not None
        assert self.consumer is not None
        return self.relay, self.consumer

    # ---------------------------------------------------------------- writing

    def commit(self, messages: Sequence[Message]) -> None:
        """One business transaction enqueueing ``messages``."""
        with Session(self.engine) as session, session.begin():
            self.outbox.enqueue_many(session, messages)

    def ordinary(self, count: int) -> list[Message]:
        """``count`` ordinary messages on the ``other`` topic, each under a key of its own."""
        made = []
        for _ in range(count):
            self._key += 1
            made.append(
                self.outbox.message(
                    self.other, {"n": self._key}, key=f"other-{self._key}", headers={"k": "v"}
                )
            )
        return made

    def raw(
        self,
        messages: Sequence[RawMessage],
        *,
        topic: str | None = None,
        kafka_config: dict[str, Any] | None = None,
    ) -> None:
        """Publish ``messages`` straight to the broker, as a producer that is not postroom."""
        asyncio.run(
            self.rig.publish_raw_many(topic or self.topic, messages, kafka_config=kafka_config)
        )

    # ---------------------------------------------------------------- reading

    def handlers_run(self, message_id: str) -> list[str]:
        """The handlers that ran for ``message_id`` (one entry per run)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(f"SELECT handler FROM {self.effects} WHERE message_id = :id"),
                {"id": message_id},
            )
            return [r[0] for r in rows]

    def run_counts(self, ids: Iterable[str]) -> dict[str, int]:
        """How many times any handler ran for each of ``ids``."""
        wanted = list(ids)
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(
                    f"SELECT message_id, count(*) FROM {self.effects} "
                    "WHERE message_id = ANY(:ids) GROUP BY message_id"
                ),
                {"ids": wanted},
            )
            found = {r[0]: int(r[1]) for r in rows}
        return {i: found.get(i, 0) for i in wanted}

    def outbox_rows(self) -> int:
        """Rows in the outbox, whatever their status (published rows are kept a day)."""
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    text(f'SELECT count(*) FROM "{self.schema}"."{self.tables.outbox.name}"')
                ).scalar_one()
            )

    def row(self, message_id: uuid.UUID | str) -> tuple[str, str | None, int]:
        """The outbox row's status, last error and attempts."""
        with self.engine.connect() as connection:
            found = connection.execute(
                text(
                    f'SELECT status, last_error, attempts FROM "{self.schema}".'
                    f'"{self.tables.outbox.name}" WHERE id = :id'
                ),
                {"id": str(message_id)},
            ).one()
        return str(found[0]), found[1], int(found[2])

    def wait_row(
        self, message_id: uuid.UUID | str, status: str, within: float = 30.0
    ) -> tuple[str, str | None, int]:
        """Wait until the outbox row has ``status``; return (status, last_error, attempts)."""

        def look() -> tuple[str, str | None, int] | None:
            self.check_alive()
            found = self.row(message_id)
            return found if found[0] == status else None

        return wait_until_sync(
            look,
            within=within,
            what=f"outbox row {message_id} {status}",
            interval=0.1,
            detail=lambda: f"row now {self.row(message_id)}\n{self.fleet.tails(15)}",
        )

    def dead_letters(self) -> list[Delivered]:
        """Every message on the consumer's dead-letter queue/topic so far."""
        if self._dead_reader is not None:
            return self._dead_reader.received
        self._dead += asyncio.run(drain_queue(AMQP_URL, dead_letter_name(self.consumer_name)))
        return list(self._dead)

    def wait_dead_letter(
        self, match: Callable[[Delivered], bool], what: str, within: float = 30.0
    ) -> Delivered:
        """Wait for the dead letter ``match`` picks; return it."""

        def look() -> Delivered | None:
            self.check_alive()
            return next((d for d in self.dead_letters() if match(d)), None)

        return wait_until_sync(
            look,
            within=within,
            what=f"the dead letter of {what}",
            interval=0.2,
            detail=lambda: self.fleet.tails(15),
        )

    def wait_handled_once(self, ids: Iterable[str], within: float = 60.0) -> float:
        """Wait until a handler ran for every id, then check none ran twice; seconds taken."""
        wanted = [str(i) for i in ids]
        started = time.monotonic()

        def look() -> bool:
            self.check_alive()
            return all(self.run_counts(wanted).values())

        wait_until_sync(
            look,
            within=within,
            what=f"{len(wanted)} messages handled",
            interval=0.1,
            detail=lambda: (
                f"{sum(1 for n in self.run_counts(wanted).values() if n == 0)} not handled\n"
                + self.fleet.tails(15)
            ),
        )
        taken = time.monotonic() - started
        twice = {i: n for i, n in self.run_counts(wanted).items() if n != 1}
        assert not twice, f"handled more than once: {twice}"
        return taken

    def consumer_mark(self) -> int:
        """The consumer's JSON events so far (``after`` for :meth:`wait_consumer_event`)."""
        return self.services[1].mark()

    def wait_consumer_event(
        self, name: str, *, after: int = 0, count: int = 1, within: float = 30.0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until the consumer logged ``count`` events ``name`` with these ``fields``."""
        consumer = self.services[1]

        def look() -> list[dict[str, Any]] | None:
            consumer.check_alive()
            found = [
                e
                for e in consumer.events(name, after=after)
                if all(e.get(k) == v for k, v in fields.items())
            ]
            return found if len(found) >= count else None

        return wait_until_sync(
            look,
            within=within,
            what=f"{count} {name} {fields}",
            interval=0.1,
            detail=lambda: consumer.tail(20),
        )

    def metrics(self, port: int | None = None) -> str:
        status, body = http_get(port or self.consumer_port, "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body

    # ---------------------------------------------------------------- every case's end

    def check_alive(self) -> None:
        for process in self.services:
            process.check_alive()

    def flowing(self, others: Sequence[Message], within: float = 60.0) -> str:
        """Check the ordinary messages were all published and handled once; describe it."""
        taken = self.wait_handled_once([str(m.id) for m in others], within=within)
        for message in others:
            assert self.row(message.id)[0] == "published", f"{message.id} not published"
        return f"{len(others)}/{len(others)} once, {taken:.1f} s"

    def finish(
        self,
        case: str,
        fate: str,
        other_traffic: str,
        *,
        relay_mib: float = 200,
        consumer_mib: float = 250,
        extra_lines: Iterable[str] = (),
    ) -> Outcome:
        """The checks of every case: both services alive, peak RSS under the bounds, no
        secret in any line they (or the case's commands, ``extra_lines``) wrote."""
        relay, consumer = self.services
        self.check_alive()
        relay_peak = relay.sample_rss() / 1024
        consumer_peak = consumer.sample_rss() / 1024
        lines = [*extra_lines]
        for process in self.fleet.relays:
            lines += process.lines()
        assert not leaked(lines, self.planted.all()), leaked(lines, self.planted.all())[:3]
        assert relay_peak < relay_mib, f"relay peak RSS {relay_peak:.0f} MiB > {relay_mib}"
        assert consumer_peak < consumer_mib, (
            f"consumer peak RSS {consumer_peak:.0f} MiB > {consumer_mib}"
        )
        outcome = Outcome(case, self.broker, fate, other_traffic, relay_peak, consumer_peak)
        OUTCOMES.append(outcome)
        return outcome
