"""Scale: a big history, two relays, and the relay's memory while draining a big backlog.

- History: the in-process relay drains the same backlog to Kafka from an outbox without
  history and from one already holding ``history`` published rows. The history is made by
  the relay's own path: the rows are written pending (50,000 with ``enqueue_many``, the
  rest with one ``INSERT ... SELECT`` of the same shape), then a relay publishes them to
  Kafka and marks each one published. Neither table is vacuumed by hand (``ANALYZE``
  only), so the dead tuples the marks leave are there unless autovacuum, with the outbox's
  own settings, has come by; the tuple counts at the start of each drain are reported.
  Empty and history drains alternate in ABBA order. Target: within 10 %.
- Relays: ``postroom relay`` processes (the CLI, as deployed) on an empty outbox; once the
  partitions are shared out, a backlog is committed in one transaction (with a NOTIFY) and
  the clock runs until no row is pending. One relay against two, to Kafka, in ABBA order.
- Memory: one ``postroom relay`` process drains a backlog of ``rows`` rows (inserted before
  it starts) to Kafka; its RSS is read from ``/proc/<pid>/status`` every 100 ms and its
  progress from its ``/metrics`` endpoint. Kafka (an in-memory broker here, topic deleted
  afterwards) because RabbitMQ drains a million rows about four times slower; the relay's
  own memory does not depend on the broker's speed.

    python bench/scale.py [--history 1000000] [--messages 50000] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from common import (
    KAFKA_URL,
    RelayProcess,
    alternating,
    bench_schema,
    check_all,
    create_kafka_topic,
    delete_kafka_topics,
    free_port,
    quiet,
    result_row,
    unique,
    wait_for_shares,
    wait_until,
)
from relay_throughput import relay_drain

HISTORY_TOLERANCE = 0.10
#: RSS growth from 10 % to 90 % of a drain above which memory is not "flat".
FLAT_MB = 10.0


# ----------------------------------------------------------------------------- history


async def history_scenario(count: int, history: int) -> list[dict[str, Any]]:
    """Scenario 4a: the same drain with an empty outbox and with ``history`` published rows."""
    topic = unique("bench.history.")
    create_kafka_topic(topic)
    try:
        # A first short drain warms the broker's topic and the caches, so neither measured
        # drain pays for being first.
        await relay_drain(KAFKA_URL, min(count, 5000), topic, 500)
        empty, full = await alternating(
            lambda: relay_drain(KAFKA_URL, count, topic, 500, vacuum=False),
            lambda: relay_drain(KAFKA_URL, count, topic, 500, history=history, vacuum=False),
        )
    finally:
        delete_kafka_topics(topic)
    ratio = full["rate"] / empty["rate"]
    return [
        result_row(
            f"4 scale, {count:,} msgs with {history:,} rows the relay published before",
            "kafka",
            f"{full['rate']:,.0f} msg/s (ABBA runs {_listed(full['rates'])}; "
            f"{full['dead_tuples']:,} dead tuples, {full['autovacuums']} autovacuums)",
            f"{empty['rate']:,.0f} msg/s (empty table; runs {_listed(empty['rates'])})",
            ratio,
            f">= {1 - HISTORY_TOLERANCE:.2f}x empty",
            ratio >= 1 - HISTORY_TOLERANCE,
            messages=count,
            history_rows=history,
            empty=empty,
            with_history=full,
        )
    ]


def _listed(rates: list[int]) -> str:
    return " / ".join(f"{r:,}" for r in rates)


# ------------------------------------------------------------------------ relay processes


async def drain_with_relays(relays: int, count: int) -> dict[str, Any]:
    """Seconds from committing ``count`` rows to none pending, with ``relays`` processes."""
    topic = unique("bench.relays.")
    create_kafka_topic(topic)
    processes: list[RelayProcess] = []
    try:
        with bench_schema() as schema:
            try:
                for _ in range(relays):
                    processes.append(RelayProcess(schema.name, KAFKA_URL))
                await wait_for_shares(schema, processes)
                started = time.perf_counter()
                # The backlog and the NOTIFY that wakes the relays, in one transaction.
                await asyncio.to_thread(schema.bulk_insert, count, topic, notify=True)
                committed = time.perf_counter()
                await wait_until(
                    lambda: not schema.has_pending(),
                    within=900 - (time.perf_counter() - started),
                    interval=0.05,
                    what="the relays draining the backlog",
                    watch=lambda: check_all(processes),
                    error=TimeoutError,
                )
                elapsed = time.perf_counter() - committed
            finally:
                for p in processes:
                    p.stop()
    finally:
        delete_kafka_topics(topic)
    return {
        "relays": relays,
        "seconds": elapsed,
        "rate": count / elapsed,
        "insert_seconds": committed - started,
    }


async def relays_scenario(count: int) -> list[dict[str, Any]]:
    """Scenario 4b: one relay process against two, same backlog, in ABBA order."""
    one, two = await alternating(
        lambda: drain_with_relays(1, count), lambda: drain_with_relays(2, count)
    )
    ratio = two["rate"] / one["rate"]
    return [
        result_row(
            f"4 scale, {count:,} msgs, two relay processes",
            "kafka",
            f"{two['rate']:,.0f} msg/s (2 relays; ABBA runs {_listed(two['rates'])})",
            f"{one['rate']:,.0f} msg/s (1 relay; runs {_listed(one['rates'])})",
            ratio,
            "",
            None,
            messages=count,
            one=one,
            two=two,
        )
    ]


# ---------------------------------------------------------------------------- memory


async def memory_scenario(rows: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scenario 4c: RSS of one relay process draining ``rows`` rows (series for a chart)."""
    topic = unique("bench.memory.")
    create_kafka_topic(topic)
    series: list[tuple[float, float, int]] = []
    try:
        with bench_schema() as schema:
            insert_seconds = await asyncio.to_thread(schema.bulk_insert, rows, topic)
            await asyncio.to_thread(schema.vacuum_analyze)
            relay = RelayProcess(schema.name, KAFKA_URL, metrics_port=free_port())
            try:
                started = time.perf_counter()
                published = 0
                while published < rows:
                    relay.check()
                    await asyncio.sleep(0.1)
                    rss, _ = relay.rss_mb()
                    try:
                        published = await asyncio.to_thread(relay.published)
                    except OSError:
                        continue  # the metrics endpoint is not up yet
                    series.append(
                        (round(time.perf_counter() - started, 2), round(rss, 1), published)
                    )
                    if time.perf_counter() - started > 1800:
                        raise TimeoutError("the relay did not drain the backlog")
                elapsed = time.perf_counter() - started
                _, peak = relay.rss_mb()
            finally:
                relay.stop()
    finally:
        delete_kafka_topics(topic)

    def at(fraction: float) -> float:
        return next(rss for _, rss, done in series if done >= fraction * rows)

    marks = {f"rss_{int(f * 100)}pct_mb": at(f) for f in (0.1, 0.5, 0.9)}
    growth = marks["rss_90pct_mb"] - marks["rss_10pct_mb"]
    measured = (
        f"peak {peak:.0f} MB; at 10/50/90 %: {marks['rss_10pct_mb']:.0f}/"
        f"{marks['rss_50pct_mb']:.0f}/{marks['rss_90pct_mb']:.0f} MB"
    )
    row = result_row(
        f"4 scale, relay RSS draining {rows:,} rows",
        "kafka",
        measured,
        f"{series[0][1]:.0f} MB at start",
        None,
        f"flat: +< {FLAT_MB:g} MB from 10 % to 90 %",
        growth < FLAT_MB,
        rows=rows,
        peak_mb=round(peak, 1),
        growth_mb=round(growth, 1),
        drain_seconds=round(elapsed, 1),
        rate=round(rows / elapsed),
        insert_seconds=round(insert_seconds, 1),
        **marks,
    )
    return [row], {"rows": rows, "series": series}


def main() -> None:
    from run import print_table, save

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--relays-messages", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", default="history,relays,memory")
    args = parser.parse_args()
    quiet()

    async def run() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if "history" in args.only:
            rows += await history_scenario(args.messages, args.history)
        if "relays" in args.only:
            rows += await relays_scenario(args.relays_messages)
        if "memory" in args.only:
            rows += (await memory_scenario(args.rows))[0]
        return rows

    rows = asyncio.run(run())
    print_table(rows)
    save(rows, "scale")


if __name__ == "__main__":
    main()
