"""`postroom dead-letter show` keeps memory bounded by one letter, not by the queue.

Thirty 5 MB dead letters and one small one sit on a consumer's dead-letter queue (RabbitMQ)
or topic (Kafka); showing the small one runs as a real subprocess whose peak resident size
(``ru_maxrss`` of a wrapper's only child) must stay under 150 MB, well below the 150 MB the
queue holds, and every letter must still be there afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from postroom.message import Message
from tests.support.cli import environment
from tests.support.consuming import unique
from tests.support.readback import create_topics
from tests.support.services import (
    AMQP_URL,
    KAFKA_BOOTSTRAP,
    KAFKA_URL,
    kafka_available,
    rabbitmq_available,
)

BIG = 5 * 1024 * 1024
BIG_LETTERS = 30
PEAK_LIMIT_KB = 150 * 1024

#: Runs the command given as arguments, then reports its output and its peak RSS (KiB).
WRAPPER = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": done.returncode, "out": done.stdout, "err": done.stderr, "peak": peak}))
"""


def measured(broker_url: str, *args: str) -> dict[str, Any]:
    """Run ``postroom dead-letter ARGS`` in a wrapper process; its result and peak RSS."""
    env = {"COLUMNS": "250", "POSTROOM_BROKER_URL": broker_url}
    command = [sys.executable, "-m", "postroom", "dead-letter", *args]
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        capture_output=True,
        text=True,
        env=environment(env, clean=True),
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def letters() -> list[Message]:
    """Thirty big dead letters, then the small one to look for."""
    big = [
        Message.create("payments", bytes([n]) * BIG, max_payload_bytes=BIG)
        for n in range(BIG_LETTERS)
    ]
    return [*big, Message.create("payments", {"the": "small one"}, key="small")]


def dead_letter_headers(message: Message, consumer: str) -> dict[str, str]:
    """The message's headers as a consumer's dead-lettered copy carries them."""
    return {
        **message.wire_headers(),
        "postroom-error": "RuntimeError: too big to handle",
        "postroom-attempts": "3",
        "postroom-consumer": consumer,
        "postroom-topic": message.topic,
    }


async def put_on_rabbitmq(consumer: str, messages: list[Message]) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(f"{consumer}.dead-letter", durable=True)
        for message in messages:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    message.body,
                    headers={**dead_letter_headers(message, consumer)},
                    content_type=message.content_type,
                    message_id=str(message.id),
                ),
                routing_key=f"{consumer}.dead-letter",
            )
    finally:
        await connection.close()


async def delete_rabbitmq_queue(name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(name)
    finally:
        await connection.close()


def put_on_kafka(consumer: str, messages: list[Message]) -> None:
    from confluent_kafka import Producer

    topic = f"{consumer}.dead-letter"
    create_topics(KAFKA_BOOTSTRAP, [topic], partitions=1)
    producer = Producer(
        {"bootstrap.servers": KAFKA_BOOTSTRAP, "message.max.bytes": 6 * 1024 * 1024, "acks": "all"}
    )
    for message in messages:
        producer.produce(
            topic,
            value=message.body,
            key=message.key,
            headers=list(dead_letter_headers(message, consumer).items()),
        )
        producer.flush(30)
    assert producer.flush(30) == 0


@pytest.mark.parametrize("kind", ["rabbitmq", "kafka"])
async def test_show_scans_a_queue_of_big_letters_in_bounded_memory(kind: str) -> None:
    consumer = unique("dlq-rss")
    sent = letters()
    small = sent[-1]
    if kind == "rabbitmq":
        rabbitmq_available()
        broker_url = AMQP_URL
        await put_on_rabbitmq(consumer, sent)
    else:
        kafka_available()
        broker_url = KAFKA_URL
        await asyncio.to_thread(put_on_kafka, consumer, sent)
    try:
        shown = await asyncio.to_thread(measured, broker_url, "show", "-c", consumer, str(small.id))
        assert shown["code"] == 0, shown["err"]
        for fact in (str(small.id), '"the": "small one"', "too big to handle"):
            assert fact in shown["out"], (fact, shown["out"])
        print(f"{kind}: peak RSS of `dead-letter show`: {shown['peak'] / 1024:.1f} MiB")
        assert shown["peak"] < PEAK_LIMIT_KB, f"{shown['peak'] / 1024:.1f} MiB"

        listed = await asyncio.to_thread(measured, broker_url, "ls", "-c", consumer, "--json")
        assert listed["code"] == 0, listed["err"]
        print(f"{kind}: peak RSS of `dead-letter ls`: {listed['peak'] / 1024:.1f} MiB")
        document = json.loads(listed["out"])
        assert document["matched"] == len(sent)
        assert {x["id"] for x in document["items"]} == {str(m.id) for m in sent}
        assert listed["peak"] < PEAK_LIMIT_KB, f"{listed['peak'] / 1024:.1f} MiB"
    finally:
        if kind == "rabbitmq":
            await delete_rabbitmq_queue(f"{consumer}.dead-letter")
