"""Shared pieces of the benchmarks: services, messages, throwaway schemas, helpers.

Every benchmark works in its own schema (``bench_<random>``), dropped afterwards, so runs
never see each other's rows or another user's tables on the shared database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import Engine

from postroom import Message
from postroom.database import create_engine
from postroom.log import configure_logging
from postroom.schema import build_tables, migrate
from postroom.schema.sql import quote_identifier, quoted_table
from postroom.schema.tables import Tables, partition_for

# The test suite's helpers (tests/support) serve the benchmarks too: the repository's root
# is not on the path of `python bench/run.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.cli import postroom_command
from tests.support.network import free_port as free_port
from tests.support.processes import ServiceProcess
from tests.support.readback import create_topics
from tests.support.services import AMQP_URL as AMQP_URL
from tests.support.services import KAFKA_BOOTSTRAP as KAFKA_BOOTSTRAP
from tests.support.services import KAFKA_URL as KAFKA_URL
from tests.support.waiting import wait_until as wait_until

DATABASE_URL = os.environ.get(
    "POSTROOM_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BROKER_URLS = {"rabbitmq": AMQP_URL, "kafka": KAFKA_URL}
#: Distinct message keys: a 500-row batch holds each key at most once (one publish round).
KEYS = 1000
FILLER = "x" * 150


def quiet() -> None:
    """postroom's own logs at warning and above only, as JSON (nothing on a tty)."""
    configure_logging(json=True, level="warning")


def make_messages(count: int, topic: str) -> list[Message]:
    """About 250-byte JSON payloads over 1,000 keys."""
    return [
        Message.create(
            topic,
            {"order_id": i, "customer": f"customer-{i % KEYS}", "total": "123.45", "note": FILLER},
            key=f"customer-{i % KEYS}",
            headers={"source": "bench"},
        )
        for i in range(count)
    ]


def unique(prefix: str) -> str:
    """``prefix`` with a short random suffix (topics, queues, consumer names)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@dataclass
class BenchSchema:
    """A migrated throwaway schema and a sync engine on the database."""

    name: str
    tables: Tables
    engine: Engine

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        """Run one statement in its own transaction; return the first row (if any)."""
        with self.engine.begin() as connection:
            result = connection.execute(text(sql), params or {})
            return result.first() if result.returns_rows else None

    def vacuum_analyze(self) -> None:
        """VACUUM ANALYZE the outbox (fresh statistics, visibility map set)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.execute(text(f"VACUUM ANALYZE {quoted_table(self.tables.outbox)}"))

    def analyze(self) -> None:
        """ANALYZE the outbox only: fresh statistics, dead tuples left where they are."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.execute(text(f"ANALYZE {quoted_table(self.tables.outbox)}"))

    def table_state(self) -> dict[str, int]:
        """The outbox's live and dead tuples and its (auto)vacuum counts, as PostgreSQL's
        statistics report them (they lag the table by up to a second)."""
        with self.engine.connect() as db:
            db.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = db.execute(
                text(
                    "SELECT n_live_tup, n_dead_tup, vacuum_count, autovacuum_count "
                    "FROM pg_stat_user_tables WHERE schemaname = :schema AND relname = :table"
                ),
                {"schema": self.name, "table": self.tables.outbox.name},
            ).one()
        keys = ("live_tuples", "dead_tuples", "vacuums", "autovacuums")
        return dict(zip(keys, (int(v) for v in row), strict=True))

    def owners(self) -> list[int]:
        """Partitions held under a live lease, counted per owner (ascending)."""
        partitions = quoted_table(self.tables.partitions)
        with self.engine.connect() as db:
            rows = db.execute(
                text(
                    f"SELECT count(*) FROM {partitions} "
                    "WHERE owner IS NOT NULL AND lease_expires_at > now() GROUP BY owner"
                )
            ).all()
        return sorted(r[0] for r in rows)

    def has_pending(self) -> bool:
        """Whether any row is still pending (walks the partial index on pending rows)."""
        outbox = quoted_table(self.tables.outbox)
        return bool(
            self.execute(f"SELECT EXISTS (SELECT 1 FROM {outbox} WHERE status = 'pending')")[0]
        )

    def bulk_insert(
        self, count: int, topic: str, *, status: str = "pending", notify: bool = False
    ) -> float:
        """Insert ``count`` keyed ~250-byte rows with one INSERT ... SELECT; return seconds.

        Same shape as :func:`make_messages` (1,000 keys, each on the partition the
        outbox would give it). ``status='published'`` writes history: rows already sent.
        ``notify`` wakes the relays in the same transaction, as ``enqueue`` does.
        """
        outbox = quoted_table(self.tables.outbox)
        partitions = [partition_for(f"customer-{k}", uuid.UUID(int=0)) for k in range(KEYS)]
        published = "now()" if status == "published" else "NULL"
        sql = f"""
INSERT INTO {outbox} (id, topic, key, partition, payload, content_type, headers,
                      created_at, available_at, status, published_at, next_attempt_at)
SELECT gen_random_uuid(), CAST(:topic AS text), 'customer-' || (i % {KEYS}),
       (CAST(:partitions AS smallint[]))[i % {KEYS} + 1],
       convert_to(json_build_object('order_id', i, 'customer', 'customer-' || (i % {KEYS}),
                                    'total', '123.45', 'note', CAST(:filler AS text))::text,
                  'UTF8'),
       'application/json', '{{"source": "bench"}}'::jsonb,
       now(), now(), CAST(:status AS text), {published}, now()
FROM generate_series(0, CAST(:count AS integer) - 1) AS i
"""
        params = {
            "topic": topic,
            "partitions": partitions,
            "filler": FILLER,
            "status": status,
            "count": count,
        }
        started = time.perf_counter()
        with self.engine.begin() as connection:
            connection.execute(text(sql), params)
            if notify:
                connection.execute(
                    text("SELECT pg_notify(:channel, '')"),
                    {"channel": self.tables.notify_channel},
                )
        return time.perf_counter() - started


@contextlib.contextmanager
def bench_schema(database_url: str = DATABASE_URL) -> Iterator[BenchSchema]:
    """A fresh schema with postroom's tables, dropped on the way out."""
    name = unique("bench_")
    tables = build_tables(name)
    migrate.upgrade(database_url, tables)
    engine = create_engine(database_url)
    try:
        yield BenchSchema(name, tables, engine)
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {quote_identifier(name)} CASCADE"))
        engine.dispose()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p95 and p99 in milliseconds (``samples`` in seconds)."""
    if len(samples) < 2:
        value = round(samples[0] * 1000, 2) if samples else float("nan")
        return {"p50": value, "p95": value, "p99": value}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {name: round(cuts[i] * 1000, 2) for name, i in (("p50", 49), ("p95", 94), ("p99", 98))}


async def alternating(
    *measurements: Callable[[], Awaitable[dict[str, Any]]], rounds: int = 2
) -> tuple[dict[str, Any], ...]:
    """Run each measurement ``rounds`` times, in order and then in reverse order (ABBA,
    ABCCBA, ...), and keep the best ``rate`` of each (the least disturbed by whatever else
    the machine ran); every rate is kept in the result's ``rates``. Results come back in
    the order the measurements were given."""
    runs: list[list[dict[str, Any]]] = [[] for _ in measurements]
    for i in range(rounds):
        order = range(len(measurements)) if i % 2 == 0 else reversed(range(len(measurements)))
        for which in order:
            runs[which].append(await measurements[which]())
    best = []
    for results in runs:
        top = max(results, key=lambda r: r["rate"])
        best.append({**top, "rates": [round(r["rate"]) for r in results]})
    return tuple(best)


def create_kafka_topic(topic: str, partitions: int = 8) -> None:
    """Create ``topic`` up front (a consumer only sees new topics at a metadata refresh)."""
    create_topics(KAFKA_BOOTSTRAP, [topic], partitions=partitions)


def delete_kafka_topics(*topics: str) -> None:
    """Delete benchmark topics: the broker here keeps everything in memory."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
    for future in admin.delete_topics(list(topics)).values():
        with contextlib.suppress(Exception):
            future.result(30)


@contextlib.asynccontextmanager
async def rabbitmq_sink(topic: str) -> AsyncIterator[Any]:
    """A queue bound to ``topic`` on the relay's exchange (so messages are routable);
    yields the exchange."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange("postroom", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(unique("bench-"), exclusive=True)
    await queue.bind(exchange, topic)
    try:
        yield exchange
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


def result_row(
    scenario: str,
    broker: str,
    measured: str,
    baseline: str = "",
    ratio: float | None = None,
    target: str = "",
    met: bool | None = None,
    /,
    **details: Any,
) -> dict[str, Any]:
    """One line of the summary table, with the raw figures behind it in ``details``."""
    return {
        "scenario": scenario,
        "broker": broker,
        "measured": measured,
        "baseline": baseline,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": target,
        "met": met,
        "details": details,
    }


# ------------------------------------------------------------------- relay processes


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram as scraped: bucket bounds, cumulative counts, sum, count."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    sum: float
    count: float

    def __sub__(self, before: Histogram) -> Histogram:
        """The observations made between ``before`` and this scrape."""
        return Histogram(
            self.bounds,
            tuple(a - b for a, b in zip(self.cumulative, before.cumulative, strict=True)),
            self.sum - before.sum,
            self.count - before.count,
        )

    def quantile(self, q: float) -> float:
        """The ``q`` quantile in seconds, interpolated linearly inside its bucket (as
        PromQL's histogram_quantile does); NaN without observations, the last finite
        bound when it falls in +Inf."""
        if self.count <= 0:
            return float("nan")
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return lower

    def mean(self) -> float:
        """The mean in seconds (exact: from the sum and count)."""
        return self.sum / self.count if self.count > 0 else float("nan")


def parse_histograms(text: str, names: tuple[str, ...]) -> dict[str, Histogram]:
    """The histograms ``names`` (without labels) from Prometheus text exposition."""
    found: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in names:
            continue
        buckets: list[tuple[float, float]] = []
        total = count = 0.0
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
        buckets.sort()
        found[family.name] = Histogram(
            tuple(b for b, _ in buckets), tuple(c for _, c in buckets), total, count
        )
    return found


class RelayProcess:
    """One ``postroom relay`` subprocess (the CLI, as deployed), its log in a temporary file.

    Settings are the CLI's defaults apart from a short lease (3 s, so relays share
    partitions quickly). The process is the test suite's :class:`ServiceProcess`.
    """

    def __init__(self, schema: str, broker_url: str, *, metrics_port: int = 0):
        self.metrics_port = metrics_port
        self.log_dir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env["PGAPPNAME"] = "postroom-bench-relay"
        self.process = ServiceProcess(
            relay_id="bench-relay",
            command=[
                *postroom_command(),
                "relay",
                "--database-url",
                DATABASE_URL,
                "--schema",
                schema,
                "--broker-url",
                broker_url,
                "--log-format",
                "json",
                "--metrics-port",
                str(metrics_port),
                "--lease",
                "3s",
            ],
            env=env,
            log_path=self.log_dir / "relay.log",
            application_name=env["PGAPPNAME"],
        ).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        if not self.process.alive:
            tail = self.process.log_path.read_text()[-2000:]
            raise RuntimeError(f"relay exited with {self.process.returncode}:\n{tail}")

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB: resident now, and the peak so far."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in {"VmRSS", "VmHWM"}:
                fields[name] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the relay process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def published(self) -> int:
        """The relay's postroom_relay_published_total, from its /metrics endpoint."""
        for line in self.scrape().splitlines():
            if line.startswith("postroom_relay_published_total"):
                return int(float(line.split()[-1]))
        return 0

    def scrape(self) -> str:
        """The text of the relay's /metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())

    def histograms(self, *names: str) -> dict[str, Histogram]:
        """The relay's histograms ``names`` as they stand now."""
        return parse_histograms(self.scrape(), names)

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):  # not gone 30 s after SIGTERM: killed
            self.process.terminate(30)
        shutil.rmtree(self.log_dir, ignore_errors=True)


async def wait_for_shares(schema: BenchSchema, processes: list[RelayProcess]) -> None:
    """Wait until the relays hold the 64 partitions, shared out evenly."""
    share = 64 // len(processes)
    owners: list[int] = []

    def shared() -> bool:
        owners[:] = schema.owners()
        return len(owners) == len(processes) and min(owners) >= share and sum(owners) == 64

    await wait_until(
        shared,
        within=90,
        interval=0.2,
        what="relays sharing the partitions",
        watch=lambda: check_all(processes),
        detail=lambda: f"relays did not share the partitions: {owners}",
        error=TimeoutError,
    )


def check_all(processes: list[RelayProcess]) -> None:
    """Fail if any of the relays exited."""
    for p in processes:
        p.check()
