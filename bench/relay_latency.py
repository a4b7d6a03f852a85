"""Relay latency: from a committed transaction to the message arriving at a RabbitMQ consumer.

Measures single messages on an idle system (the NOTIFY path), then steady offered loads,
one message per committed transaction. The baseline, measured in the same run, is aio-pika
publishing the same messages straight to RabbitMQ (publisher confirms, one at a time per
sender) to the same consumer: what the broker round trip costs without an outbox.

Three processes, so that none of them measures another's CPU time as latency: the relay
is a ``postroom relay`` process with the CLI's default settings; the load comes from a
generator process (this file with ``--generate``), whose senders each hold one psycopg
connection and commit one ``Outbox.enqueue_async`` per transaction (or publish one
message with aio-pika, for the baseline), ``rate / 100`` senders at 100 msg/s each; this
process only consumes and records arrival time minus the sent-at header.

No coordinated omission: the sent-at header is each message's *intended* send time on the
schedule (sender start + n / rate), not the moment it was really sent. A sender that falls
behind sends at once to catch up, and each late message is charged the wait it spent
behind the schedule, as a user whose request queued would be. A sender stops at twice the
run's length; what it did not send by then is counted as unsent. Each load reports the
rate the senders achieved beside the offered one, and a row whose senders achieved less
than 95 % of it is marked ``SHORTFALL`` (its percentiles then leave out the messages never
sent, so they are a lower bound).

Each offered load runs the relay and the direct publish in ABBA order (direct, relay,
relay, direct) and reports both passes. PostgreSQL, RabbitMQ and all three processes share
the machine's cores; each row gives the 1-minute load average before and after its pass.

Each relay pass also gets a breakdown row. Commit→claim and claim→confirm come from the
relay's own histograms (``postroom_relay_claim_delay_seconds``,
``postroom_relay_publish_seconds``), scraped before and after the pass: percentiles
interpolated inside the buckets of the difference (as PromQL's histogram_quantile does),
means exact (sum / count). Commit→consumer is measured per message by this process, from
the message's ``postroom-created-at`` header (set when it was enqueued, before the
commit) to its arrival. Confirm→consumer cannot be matched per message (the relay does
not expose when each message was confirmed), so only its mean is given: the mean
commit→consumer minus the two stages' means. It can be negative: RabbitMQ may hand a
message to the consumer before the publisher's confirm arrives. The schedule lag is what
the generator's senders added before enqueuing (intended send time to enqueue), which the
end-to-end figures include. The row also gives the relay process's CPU time over the pass
(generator start to last arrival) as a share of one core.

    python bench/relay_latency.py [--rates 200,1000,3000] [--seconds 10]

``bench/run.py`` runs this with the other scenarios and prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import datetime
from typing import Any

import aio_pika
from common import (
    AMQP_URL,
    DATABASE_URL,
    Histogram,
    RelayProcess,
    bench_schema,
    free_port,
    percentiles,
    quiet,
    result_row,
    unique,
    wait_for_shares,
    wait_until,
)

SENT_AT = "bench-sent-at"
IDLE_MESSAGES = 20
IDLE_GAP = 0.3
PER_SENDER = 100
TARGET_RATE = 1000
TARGET_P99_MS = 25.0
TARGET_IDLE_MS = 10.0
#: Below this fraction of the offered rate a load is reported as a shortfall.
SHORTFALL_BELOW = 0.95
#: The first pass's order at each load; the second pass runs it backwards (ABBA).
DIRECT_FIRST = ("raw aio-pika", "relay")
PAYLOAD = {"pad": "x" * 200}
CREATED_AT = "postroom-created-at"
CLAIM_DELAY = "postroom_relay_claim_delay_seconds"
PUBLISH = "postroom_relay_publish_seconds"
BATCH = "postroom_relay_batch_seconds"


class Receiver:
    """A queue bound to the test topic; records arrival time minus the sent-at header."""

    def __init__(self, channel: Any, topic: str) -> None:
        self.channel = channel
        self.topic = topic
        self.latencies: list[float] = []
        self.since_enqueue: list[float] = []
        """Per relayed message: arrival minus its postroom-created-at header."""
        self.queue: Any = None

    async def start(self) -> Receiver:
        exchange = await self.channel.declare_exchange(
            "postroom", aio_pika.ExchangeType.TOPIC, durable=True
        )
        self.queue = await self.channel.declare_queue(exclusive=True)
        await self.queue.bind(exchange, self.topic)
        await self.queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: Any) -> None:
        now = time.time()
        sent = float(message.headers[SENT_AT])
        self.latencies.append(now - sent)
        created = message.headers.get(CREATED_AT)
        if created is not None:
            self.since_enqueue.append(now - datetime.fromisoformat(str(created)).timestamp())

    def clear(self) -> None:
        self.latencies.clear()
        self.since_enqueue.clear()

    async def wait_for(self, count: int, seconds: float = 30.0) -> None:
        await wait_until(
            lambda: len(self.latencies) >= count,
            within=seconds,
            interval=0.01,
            what=f"{count} messages",
            detail=lambda: f"only {len(self.latencies)} of {count} messages arrived",
            error=TimeoutError,
        )


# ------------------------------------------------------------------ load generator process


async def offered_load(send: Any, rate: float, seconds: float, wall_start: float) -> int:
    """Call ``send(intended)`` ``rate`` times a second for ``seconds``; return how many
    were sent. ``intended`` is the message's wall-clock time on the schedule
    (``wall_start + n / rate``), which the message carries as its sent-at time.

    A sender that falls behind sends at once (no pause, and still stamped with the
    schedule's time) but stops at twice ``seconds``.
    """
    total = int(rate * seconds)
    started = time.perf_counter() + (wall_start - time.time())
    give_up = started + 2 * seconds
    for n in range(total):
        now = time.perf_counter()
        if now > give_up:
            return n
        delay = started + n / rate - now
        if delay > 0:
            await asyncio.sleep(delay)
        await send(wall_start + n / rate)
    return total


async def generate(
    sender: str, schema: str, topic: str, rate: float, seconds: float, senders: int = 0
) -> dict[str, Any]:
    """The generator process: ``rate`` msg/s for ``seconds`` through ``sender`` ("relay":
    commit to the outbox, "relay, no notify": the same without NOTIFY, "raw aio-pika"),
    spread over ``senders`` connections (default: one per 100 msg/s)."""
    import psycopg

    from postroom import Outbox
    from postroom.schema import build_tables
    from postroom.urls import psycopg_conninfo

    senders = senders or max(1, round(rate / PER_SENDER))
    closers: list[Any] = []

    async def make_sender() -> Any:
        """A warmed-up sender: it has sent once already (see :func:`generate`)."""
        if sender.startswith("relay"):
            outbox = Outbox(build_tables(schema), notify=sender == "relay")
            db = await psycopg.AsyncConnection.connect(psycopg_conninfo(DATABASE_URL))
            closers.append(db.close)

            async def commit_one(intended: float) -> None:
                async with db.transaction():
                    await outbox.enqueue_async(
                        db, topic, PAYLOAD, headers={SENT_AT: repr(intended)}
                    )

            # Warm-up: the same transaction, rolled back (no row, no notification).
            async with db.transaction(force_rollback=True):
                await outbox.enqueue_async(db, topic, PAYLOAD, headers={SENT_AT: "0"})
            return commit_one
        connection = await aio_pika.connect(AMQP_URL)
        closers.append(connection.close)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("postroom")
        body = json.dumps(PAYLOAD).encode()

        async def raw_one(intended: float, routing_key: str = topic) -> None:
            message = aio_pika.Message(body, headers={SENT_AT: repr(intended)})
            await exchange.publish(message, routing_key=routing_key)

        # Warm-up: the same publish to a routing key nothing is bound to (dropped).
        await raw_one(0.0, routing_key=f"{topic}.warm-up")
        return raw_one

    # Each sender sends once before the schedule starts, outside the measurement: the
    # first call in a fresh process (lazy imports, SQL text, the connection's first
    # statements) took ~60 ms, which put every sender behind from the first message and
    # made the senders catch up in a burst. An application sending 1,000 msg/s is warm;
    # every scheduled message is still sent and charged from its intended time.
    sends = [await make_sender() for _ in range(senders)]
    try:
        # Senders start on one schedule, offset so that together they send evenly.
        wall_start = time.time() + 0.05
        counts = await asyncio.gather(
            *(
                offered_load(send, rate / senders, seconds, wall_start + i / rate)
                for i, send in enumerate(sends)
            )
        )
        # From the schedule's start to the last send's end (closing is not sending).
        elapsed = time.time() - wall_start
    finally:
        for close in closers:
            await close()
    offered = sum(int(rate / senders * seconds) for _ in sends)
    sent = sum(counts)
    achieved = sent / max(elapsed, seconds)
    return {
        "offered": offered,
        "sent": sent,
        "unsent": offered - sent,
        "offered_rate": rate,
        "achieved_rate": round(achieved, 1),
        "shortfall": achieved < SHORTFALL_BELOW * rate,
        "senders": senders,
    }


async def run_generator(
    sender: str, schema: str, topic: str, rate: float, seconds: float, senders: int = 0
) -> dict[str, Any]:
    """Run :func:`generate` in a separate process; return what it reports."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--generate",
        json.dumps([sender, schema, topic, rate, seconds, senders]),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed ({process.returncode})")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


# ---------------------------------------------------------------------------- measurement


async def measure(rates: list[int], seconds: float) -> list[dict[str, Any]]:
    """Idle, then per rate two passes in ABBA order: raw aio-pika and relay, then relay and
    raw aio-pika. Each result keeps its samples (s)."""
    results: list[dict[str, Any]] = []
    topic = unique("bench.latency.")
    with bench_schema() as schema:
        connection = await aio_pika.connect(AMQP_URL)
        relay = RelayProcess(schema.name, AMQP_URL, metrics_port=free_port())
        try:
            receiver = await Receiver(await connection.channel(), topic).start()
            await wait_for_shares(schema, [relay])
            await asyncio.sleep(1.0)  # the relay is idle, waiting for a notification

            async def run(
                load: str, sender: str, rate: float, seconds: float, run_pass: int = 1
            ) -> None:
                receiver.clear()
                load_before = os.getloadavg()[0]
                stages = relay.histograms(CLAIM_DELAY, PUBLISH, BATCH)
                cpu, started = relay.cpu_seconds(), time.monotonic()
                report = await run_generator(sender, schema.name, topic, rate, seconds)
                await receiver.wait_for(report["sent"], seconds=60)
                relay.check()
                if sender.startswith("relay"):
                    after = relay.histograms(CLAIM_DELAY, PUBLISH, BATCH)
                    stages = {name: after[name] - stages[name] for name in after}
                    report["breakdown"] = breakdown(stages, receiver)
                    busy = (relay.cpu_seconds() - cpu) / (time.monotonic() - started)
                    report["breakdown"]["relay_cpu_percent"] = round(100 * busy, 1)
                report["load_average"] = (load_before, os.getloadavg()[0])
                results.append(
                    {
                        "load": load,
                        "sender": sender,
                        "rate": rate,
                        "pass": run_pass,
                        **report,
                        "samples": list(receiver.latencies),
                    }
                )

            await run("idle", "relay", 1 / IDLE_GAP, IDLE_MESSAGES * IDLE_GAP)
            for rate in rates:
                for run_pass, order in ((1, DIRECT_FIRST), (2, DIRECT_FIRST[::-1])):
                    for sender in order:
                        load = f"{rate} msg/s, pass {run_pass}"
                        await run(load, sender, rate, seconds, run_pass)
        finally:
            relay.stop()
            await connection.close()
    for r in results:
        r["messages"] = len(r["samples"])
        r.update(percentiles(r["samples"]))
    return results


def breakdown(stages: dict[str, Histogram], receiver: Receiver) -> dict[str, Any]:
    """Commit→claim and claim→confirm (the relay's histograms over the pass), commit→
    consumer (per message), confirm→consumer's mean and the generator's schedule lag,
    in milliseconds."""
    claim, publish = stages[CLAIM_DELAY], stages[PUBLISH]
    since = receiver.since_enqueue
    ms = {
        "claim_p50": claim.quantile(0.5) * 1000,
        "claim_p99": claim.quantile(0.99) * 1000,
        "claim_mean": claim.mean() * 1000,
        "publish_p50": publish.quantile(0.5) * 1000,
        "publish_p99": publish.quantile(0.99) * 1000,
        "publish_mean": publish.mean() * 1000,
        "observed": claim.count,
        "batches": stages[BATCH].count,
        "batch_p99": stages[BATCH].quantile(0.99) * 1000,
    }
    if since:
        end_to_end = percentiles(since)
        ms["commit_consumer_p50"] = end_to_end["p50"]
        ms["commit_consumer_p99"] = end_to_end["p99"]
        mean = sum(since) / len(since) * 1000
        ms["commit_consumer_mean"] = mean
        ms["confirm_consumer_mean"] = mean - ms["claim_mean"] - ms["publish_mean"]
        lags = [total - part for total, part in zip(receiver.latencies, since, strict=True)]
        ms["schedule_lag_p99"] = percentiles(lags)["p99"]
    return {k: round(v, 2) for k, v in ms.items()}


def _breakdown_text(b: dict[str, Any]) -> str:
    text = (
        f"commit→claim p50/p99 {b['claim_p50']:.1f}/{b['claim_p99']:.1f} ms; "
        f"claim→confirm p50/p99 {b['publish_p50']:.1f}/{b['publish_p99']:.1f} ms"
    )
    if b["batches"]:
        text += f"; {b['observed'] / b['batches']:.1f} msg/batch"
    text += f"; relay CPU {b['relay_cpu_percent']:.0f} % of a core"
    if "commit_consumer_p99" in b:
        text += (
            f"; confirm→consumer mean {b['confirm_consumer_mean']:.1f} ms "
            f"(commit→consumer p50/p99 {b['commit_consumer_p50']:.1f}/"
            f"{b['commit_consumer_p99']:.1f} ms; schedule lag p99 {b['schedule_lag_p99']:.1f} ms)"
        )
    return text


def _load(r: dict[str, Any]) -> str:
    before, after = r["load_average"]
    return f"load {before:.2f}→{after:.2f}"


def _breakdown_row(label: str, relay: dict[str, Any]) -> dict[str, Any]:
    return result_row(
        f"2 latency breakdown, {label}", "rabbitmq", _breakdown_text(relay["breakdown"])
    )


def _triple(r: dict[str, Any]) -> str:
    return f"p50/p95/p99 {r['p50']:.1f}/{r['p95']:.1f}/{r['p99']:.1f} ms"


def _rates(r: dict[str, Any]) -> str:
    """``offered 1,000/s, achieved 884/s`` and, below 95 % of the offer, ``— SHORTFALL``."""
    text = f"offered {r['offered_rate']:,.0f}/s, achieved {r['achieved_rate']:,.0f}/s"
    return text + (" — SHORTFALL" if r["shortfall"] else "")


def to_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows of scenario 2: idle, then one per offered load (relay beside raw)."""
    summary = [{k: v for k, v in r.items() if k != "samples"} for r in results]
    rows = []
    idle = summary[0]
    rows.append(
        result_row(
            f"2 latency, idle, {idle['messages']} single messages: {_rates(idle)}, {_load(idle)}",
            "rabbitmq",
            _triple(idle),
            "",
            None,
            f"p99 <= {TARGET_IDLE_MS:g} ms",
            idle["p99"] <= TARGET_IDLE_MS,
            **idle,
        )
    )
    rows.append(_breakdown_row("idle", idle))
    by_load: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in summary[1:]:
        by_load.setdefault((r["rate"], r["pass"]), {})[r["sender"]] = r
    for (rate, run_pass), pair in by_load.items():
        relay, raw = pair["relay"], pair["raw aio-pika"]
        targeted = rate == TARGET_RATE
        order = "direct, relay" if run_pass == 1 else "relay, direct"
        rows.append(
            result_row(
                f"2 latency, {rate:,} msg/s, pass {run_pass} ({order}): {_rates(relay)}, "
                f"{_load(relay)}",
                "rabbitmq",
                _triple(relay),
                f"{_triple(raw)} (aio-pika direct; {_rates(raw)})",
                relay["p99"] / raw["p99"] if raw["p99"] else None,
                f"p99 <= {TARGET_P99_MS:g} ms at the offered rate" if targeted else "",
                # A shortfall is not the offered load: it cannot meet the target.
                relay["p99"] <= TARGET_P99_MS and not relay["shortfall"] if targeted else None,
                relay=relay,
                raw=raw,
            )
        )
        rows.append(_breakdown_row(f"{rate:,} msg/s, pass {run_pass}", relay))
    return rows


async def scenario(rates: list[int], seconds: float) -> tuple[list[dict[str, Any]], Any]:
    """Summary rows of scenario 2, and the raw results (with samples, for the charts)."""
    results = await measure(rates, seconds)
    return to_rows(results), results


def main() -> None:
    from run import print_table, save

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rates", default="200,1000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--generate", help="(internal) run as the load generator")
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(asyncio.run(generate(*json.loads(args.generate)))))
        return
    quiet()
    rates = [int(r) for r in args.rates.split(",")]
    rows, _ = asyncio.run(scenario(rates, args.seconds))
    print_table(rows)
    save(rows, "relay_latency")


if __name__ == "__main__":
    main()
