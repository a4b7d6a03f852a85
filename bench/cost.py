"""Cost per message: database statements, round trips and transactions per published row.

The in-process relay drains a backlog to Kafka (as in ``relay_throughput.py``) while two
independent counters run:

- **Client side (exact, relay only).** Every statement the relay's psycopg connections
  send is counted by wrapping ``psycopg.AsyncCursor.execute`` and the ``BEGIN``/``COMMIT``
  of ``AsyncConnection.transaction()`` for the length of the drain (the benchmark's own
  connections are synchronous, so nothing else is counted). Without pipeline mode each
  of these is one network round trip. Statements are grouped by kind (claim, mark,
  heartbeat, notify health check, other).
- **Server side (cross-check).** ``pg_stat_database`` of a database used only by this
  scenario (``<database>_bench``, created on first use): committed transactions and rows
  inserted / updated / deleted / returned, before and after the drain. The relay's
  connections are closed before the second reading, so their counters are flushed.
  Autovacuum may add a few transactions of its own.

``pg_stat_statements`` would give per-statement figures too, but it needs
``shared_preload_libraries`` and a server restart, which a shared development database
cannot take.

    python bench/cost.py [--messages 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from common import (
    DATABASE_URL,
    KAFKA_URL,
    bench_schema,
    create_kafka_topic,
    delete_kafka_topics,
    quiet,
    result_row,
    unique,
)
from relay_latency import run_generator
from relay_throughput import relay_drain
from sqlalchemy import text
from sqlalchemy.engine import make_url

from postroom.database import create_engine
from postroom.schema.sql import quote_identifier

#: Server-side counters read from pg_stat_database.
COUNTERS = ("xact_commit", "xact_rollback", "tup_returned", "tup_inserted", "tup_updated")
KINDS = (
    ("claim", "SELECT o.position"),
    ("mark", "WITH results AS"),
    ("heartbeat", "INSERT INTO"),
    ("heartbeat", "WITH gone AS"),
    ("heartbeat", "UPDATE"),
    ("wakeup", "LISTEN"),
    ("wakeup", "SELECT 1"),
)


def bench_database_url() -> str:
    """The URL of ``<database>_bench``, created if missing (its statistics are the
    scenario's alone)."""
    url = make_url(DATABASE_URL)
    name = f"{url.database}_bench"
    engine = create_engine(DATABASE_URL)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            exists = db.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if not exists:
                db.execute(text(f"CREATE DATABASE {quote_identifier(name)}"))
    finally:
        engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _kind(sql: Any) -> str:
    statement = str(sql).lstrip()
    for kind, start in KINDS:
        if statement.startswith(start):
            return kind
    return "other"


@contextlib.contextmanager
def count_statements() -> Iterator[collections.Counter[str]]:
    """Count statements (by kind) and transaction commands sent by async psycopg."""
    counts: collections.Counter[str] = collections.Counter()
    execute = psycopg.AsyncCursor.execute
    transaction = psycopg.AsyncConnection.transaction

    async def counted_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        counts[_kind(query)] += 1
        return await execute(self, query, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def counted_transaction(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["begin/commit"] += 2
        async with transaction(self, *args, **kwargs) as tx:
            yield tx

    psycopg.AsyncCursor.execute = counted_execute  # type: ignore[method-assign]
    psycopg.AsyncConnection.transaction = counted_transaction  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        psycopg.AsyncCursor.execute = execute  # type: ignore[method-assign]
        psycopg.AsyncConnection.transaction = transaction  # type: ignore[method-assign]


class Probe:
    """Started by ``relay_drain`` when the relay owns its partitions; finished after it stopped."""

    def __init__(self) -> None:
        self._counting = count_statements()
        self.counts: collections.Counter[str] = collections.Counter()
        self._before: dict[str, int] = {}
        self._schema: Any = None

    def _server(self) -> dict[str, int]:
        with self._schema.engine.connect() as db:
            db.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = db.execute(
                text(
                    f"SELECT {', '.join(COUNTERS)} FROM pg_stat_database "
                    "WHERE datname = current_database()"
                )
            ).one()
        return dict(zip(COUNTERS, map(int, row), strict=True))

    def start(self, schema: Any) -> None:
        self._schema = schema
        # Idle backends hold their statistics for up to 10 s; closed ones flush at once.
        schema.engine.dispose()
        time.sleep(1.0)
        self._before = self._server()
        self.counts = self._counting.__enter__()

    async def finish(self) -> dict[str, Any]:
        self._counting.__exit__(None, None, None)
        await asyncio.sleep(1.0)  # closed backends flush their statistics on exit
        after = self._server()
        # The two readings are themselves transactions of this database.
        delta = {k: after[k] - self._before[k] for k in COUNTERS}
        delta["xact_commit"] -= 1
        return {"client": dict(self.counts), "server": delta}


async def notify_cost(seconds: float, writers: int = 8) -> dict[str, list[int]]:
    """Commits/s of ``writers`` connections each committing one outbox row per transaction
    as fast as they can, with and without NOTIFY (no relay running: the write side only),
    in ABBA order; each side's two runs, in the order they ran."""
    rates: dict[str, list[int]] = {}
    with bench_schema() as schema:
        for sender in ("relay, no notify", "relay", "relay", "relay, no notify"):
            # An unreachable rate: the writers go flat out until the generator's cut-off
            # (twice the given seconds).
            report = await run_generator(
                sender, schema.name, "bench.notify", 1_000_000, seconds / 2, writers
            )
            rates.setdefault(sender, []).append(round(report["achieved_rate"]))
    return rates


async def scenario(count: int, notify_seconds: float = 3.0) -> list[dict[str, Any]]:
    """Summary rows of scenario 5: round trips per message, and NOTIFY's commit cost."""
    topic = unique("bench.cost.")
    create_kafka_topic(topic)
    try:
        result = await relay_drain(
            KAFKA_URL, count, topic, 500, probe=Probe(), database_url=bench_database_url()
        )
    finally:
        delete_kafka_topics(topic)
    client: dict[str, int] = result["client"]
    server: dict[str, int] = result["server"]
    statements = sum(v for k, v in client.items() if k != "begin/commit")
    round_trips = statements + client.get("begin/commit", 0)
    per = round_trips / count
    hot = client.get("claim", 0) + client.get("mark", 0)
    measured = (
        f"{per:.4f} round trips/msg ({round_trips:,} for {count:,}); "
        f"claim+mark {hot / count:.4f}/msg"
    )
    baseline = (
        f"server: {server['xact_commit'] / count:.4f} xact/msg, "
        f"{server['tup_updated'] / count:.2f} rows updated/msg"
    )
    rows = [
        result_row(
            f"5 cost, {count:,} msgs, batch 500",
            "kafka",
            measured,
            baseline,
            None,
            "one round trip per batch, not per message",
            hot <= 2 * (count / 500) + 4,
            messages=count,
            client_statements=client,
            server_counters=server,
            round_trips_per_message=round(per, 5),
            statements_per_message=round(statements / count, 5),
        ),
    ]
    runs = await notify_cost(notify_seconds)
    rates = {sender: max(values) for sender, values in runs.items()}
    with_notify, without = rates["relay"], rates["relay, no notify"]

    def listed(values: list[int]) -> str:
        return " / ".join(f"{v:,}" for v in values)

    rows.append(
        result_row(
            "5 cost, NOTIFY at commit: 8 writers, 1 row per transaction, flat out",
            "postgres",
            f"{with_notify:,} commits/s with NOTIFY (ABBA runs {listed(runs['relay'])})",
            f"{without:,} commits/s without (runs {listed(runs['relay, no notify'])})",
            with_notify / without,
            "",
            None,
            writers=8,
            seconds=notify_seconds,
            **{k.replace(", ", "_").replace(" ", "_"): v for k, v in rates.items()},
            runs=runs,
        )
    )
    return rows


def main() -> None:
    from run import print_table, save

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=50_000)
    args = parser.parse_args()
    quiet()
    rows = asyncio.run(scenario(args.messages))
    print_table(rows)
    save(rows, "cost")


if __name__ == "__main__":
    main()
