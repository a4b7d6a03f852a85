"""Relay latency: from a committed transaction to the message arriving at a RabbitMQ consumer.

Measures a single message on an idle system (the NOTIFY path), then steady offered loads,
one message per committed transaction. The baseline, measured in the same run, is aio-pika
publishing the same messages straight to RabbitMQ (publisher confirms, one at a time) and
the same consumer receiving them: what the broker round trip costs without an outbox.

    python bench/relay_latency.py [--rates 200,1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from sqlalchemy import text

from postroom import Outbox, Settings
from postroom.brokers import publisher_from_url
from postroom.database import create_async_engine, create_engine
from postroom.log import configure_logging
from postroom.relay import Relay
from postroom.schema import build_tables, migrate

DATABASE_URL = os.environ.get(
    "POSTROOM_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("POSTROOM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SENT_AT = "bench-sent-at"


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p95 and p99 in milliseconds."""
    if len(samples) < 2:
        value = round(samples[0] * 1000, 2) if samples else float("nan")
        return {"p50": value, "p95": value, "p99": value}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {name: round(cuts[i] * 1000, 2) for name, i in (("p50", 49), ("p95", 94), ("p99", 98))}


class Receiver:
    """A queue bound to the test topic; records arrival time minus the sent-at header."""

    def __init__(self, channel: Any, topic: str) -> None:
        self.channel = channel
        self.topic = topic
        self.latencies: list[float] = []
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
        sent = float(message.headers[SENT_AT])
        self.latencies.append(time.time() - sent)

    async def wait_for(self, count: int, seconds: float = 30.0) -> None:
        for _ in range(int(seconds * 100)):
            if len(self.latencies) >= count:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(f"only {len(self.latencies)} of {count} messages arrived")


async def offered_load(send: Any, rate: int, seconds: float) -> int:
    """Call ``send()`` ``rate`` times a second for ``seconds``; return how many were sent."""
    total = int(rate * seconds)
    started = time.perf_counter()
    for n in range(total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send()
    return total


async def measure(rates: list[int], seconds: float) -> list[dict[str, Any]]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    tables = build_tables(schema)
    migrate.upgrade(DATABASE_URL, tables)
    engine = create_async_engine(DATABASE_URL, pool_size=8)
    outbox = Outbox(tables)
    connection = await aio_pika.connect(AMQP_URL)
    results: list[dict[str, Any]] = []
    topic = f"bench.latency.{uuid.uuid4().hex[:6]}"
    try:
        receiver = await Receiver(await connection.channel(), topic).start()
        settings = Settings(database_url=DATABASE_URL, schema=schema, metrics_port=0)
        relay = Relay(settings, publisher_from_url(AMQP_URL))
        task = asyncio.create_task(relay.run())
        for _ in range(3000):
            if relay.leases.owned:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # the relay is idle, waiting for a notification

        async def commit_one() -> None:
            # The sent-at time is taken just before the commit, inside the transaction.
            async with engine.connect() as db, db.begin():
                await outbox.enqueue_async(
                    db, topic, {"pad": "x" * 200}, headers={SENT_AT: repr(time.time())}
                )

        idle = []
        for _ in range(20):
            before = len(receiver.latencies)
            await commit_one()
            await receiver.wait_for(before + 1)
            idle.append(receiver.latencies[-1])
            await asyncio.sleep(0.3)  # idle again
        results.append({"scenario": "idle, one message", "messages": 20, **percentiles(idle)})

        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("postroom")

        async def raw_one() -> None:
            await exchange.publish(
                aio_pika.Message(
                    b'{"pad":"' + b"x" * 200 + b'"}', headers={SENT_AT: repr(time.time())}
                ),
                routing_key=topic,
            )

        for rate in rates:
            for name, send in (("raw aio-pika", raw_one), ("relay", commit_one)):
                receiver.latencies.clear()
                workers = max(1, rate // 100)

                async def worker(share: int, send: Any = send) -> int:
                    return await offered_load(send, share, seconds)

                counts = await asyncio.gather(*(worker(rate // workers) for _ in range(workers)))
                await receiver.wait_for(sum(counts))
                results.append(
                    {
                        "scenario": f"{rate} msg/s, {name}",
                        "messages": sum(counts),
                        **percentiles(receiver.latencies),
                    }
                )
        relay.stop()
        await task
    finally:
        await connection.close()
        await engine.dispose()
        sync = create_engine(DATABASE_URL)
        with sync.begin() as db:
            db.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        sync.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rates", default="200,1000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--output", default="bench/results/relay_latency.json")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    rates = [int(r) for r in args.rates.split(",")]
    results = asyncio.run(measure(rates, args.seconds))
    print(f"{'scenario':<28}{'messages':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for r in results:
        print(f"{r['scenario']:<28}{r['messages']:>10}{r['p50']:>10}{r['p95']:>10}{r['p99']:>10}")
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
