"""`postroom dead-letter ls | show | requeue` as a subprocess against real RabbitMQ and Kafka.

A consumer whose handler always fails (one attempt) dead-letters a message; the CLI finds
it, shows it, requeues it (a dry run first), and a consumer whose handler now works handles
it exactly once. On Kafka, another consumer group reading the same topic skips the
requeued copy (it is marked for the first consumer only).
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

import postroom
from postroom.consumer import ConsumerService
from postroom.message import Message
from postroom.schema import Tables
from tests.support.cli import arun_postroom, as_json
from tests.support.consuming import KAFKA_GROUP_SETTINGS, Rig, Running, settings_for, unique
from tests.support.database import count
from tests.support.services import AMQP_URL, KAFKA_URL, kafka_available, rabbitmq_available
from tests.support.waiting import wait_until

ERROR = "the payment service said no"


async def acli(broker_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m postroom dead-letter ARGS`` against ``broker_url`` (and nothing else)."""
    env = {"COLUMNS": "250", "POSTROOM_BROKER_URL": broker_url}
    return await arun_postroom("dead-letter", *args, env=env, clean=True)


@pytest.mark.parametrize("kind", ["rabbitmq", "kafka"])
async def test_dead_letter_is_listed_shown_requeued_and_handled_once(
    kind: str, database_url: str, tables: Tables, engine: Engine
) -> None:
    if kind == "rabbitmq":
        rabbitmq_available()
        broker_url = AMQP_URL
    else:
        kafka_available()
        broker_url = f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}"
    rig = Rig(kind)
    name = unique("dlq")
    other = unique("other")
    (topic,) = await rig.topics("payments", consumer=name)
    effects = f'"{tables.schema}".effects'
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {effects} (consumer text, message_id text)"))
    settings = settings_for(
        database_url,
        tables,
        consumer_max_attempts=1,
        consumer_backoff_initial=0.01,
        consumer_backoff_max=0.05,
    )
    try:
        # 1. A handler that always fails dead-letters the message after one attempt.
        failing = postroom.Consumer(name, settings)

        @failing.handler(topic)
        async def refuse(message: postroom.Message, session: AsyncSession) -> None:
            raise RuntimeError(ERROR)

        service = ConsumerService(failing, rig.subscriber(settings), settings)
        running = Running(service)
        message = Message.create(topic, {"order": 7, "total": "12.50"}, key="order-7")
        try:
            await running.started()
            await rig.publish([message])
            dead = service.metrics.dead_lettered.labels(topic)
            await wait_until(lambda: dead._value.get() >= 1, what="the message dead-lettered")
        finally:
            await running.stop()

        # 2. ls finds it; the table and --json carry the same facts.
        listed = as_json(await acli(broker_url, "ls", "--consumer", name, "--json"))
        assert listed["matched"] == 1
        (letter,) = listed["items"]
        assert letter["id"] == str(message.id)
        assert (letter["topic"], letter["key"], letter["attempts"]) == (topic, "order-7", 1)
        assert ERROR in letter["error"]
        assert letter["dead_lettered_at"] is not None
        table = await acli(broker_url, "ls", "-c", name)
        assert table.returncode == 0, table.stderr
        for fact in (str(message.id), topic, "order-7", ERROR, "1 of 1 dead letters"):
            assert fact in table.stdout, (fact, table.stdout)

        # 3. show prints its error, headers and payload.
        shown = await acli(broker_url, "show", "-c", name, str(message.id))
        assert shown.returncode == 0, shown.stderr
        for fact in (ERROR, "postroom-dead-lettered-at", '"total": "12.50"', "requeue"):
            assert fact in shown.stdout, (fact, shown.stdout)
        missing = await acli(broker_url, "show", "-c", name, "no-such-id")
        assert missing.returncode == 3
        assert "no dead letter 'no-such-id'" in missing.stderr

        # 4. A dry run changes nothing; without --yes and a terminal it refuses.
        dry = await acli(broker_url, "requeue", "-c", name, str(message.id), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would requeue 1 dead letters" in dry.stdout
        refused = await acli(broker_url, "requeue", "-c", name, "--all")
        assert refused.returncode == 2
        assert "--yes" in refused.stderr
        assert as_json(await acli(broker_url, "ls", "-c", name, "--json"))["matched"] == 1

        # 5. requeue sends it back and removes it from the dead letters.
        done = as_json(
            await acli(broker_url, "requeue", "-c", name, str(message.id), "--yes", "--json")
        )
        assert (done["matched"], done["changed"], done["failed"]) == (1, 1, [])
        after = await acli(broker_url, "ls", "-c", name)
        assert after.returncode == 0, after.stderr
        assert "No dead letters" in after.stdout
        again = await acli(broker_url, "requeue", "-c", name, "--all", "--yes")
        assert again.returncode == 0, again.stderr
        assert "Nothing to do" in again.stdout

        # 6. A consumer whose handler works handles it exactly once; on Kafka another
        # consumer group handles the original and skips the copy meant for `name`.
        def recorder(consumer: postroom.Consumer) -> None:
            @consumer.handler(topic)
            async def record(message: postroom.Message, session: AsyncSession) -> None:
                await session.execute(
                    text(f"INSERT INTO {effects} VALUES (:c, :m)"),
                    {"c": consumer.name, "m": str(message.id)},
                )

        fixed = postroom.Consumer(name, settings)
        recorder(fixed)
        services = [ConsumerService(fixed, rig.subscriber(settings), settings)]
        if kind == "kafka":
            bystander = postroom.Consumer(other, settings)
            recorder(bystander)
            services.append(ConsumerService(bystander, rig.subscriber(settings), settings))
        runners = [Running(s) for s in services]
        try:
            for runner in runners:
                await runner.started()
            handled = services[0].metrics.handled.labels(topic)
            await wait_until(lambda: handled._value.get() >= 1, what="the requeued message")
            if kind == "kafka":
                skipped = services[1].metrics.skipped.labels(topic)
                await wait_until(lambda: skipped._value.get() >= 1, what="the copy skipped")
                assert services[1].metrics.handled.labels(topic)._value.get() == 1
            await asyncio.sleep(0.5)
        finally:
            for runner in runners:
                await runner.stop()
        inbox = f'"{tables.schema}".inbox'
        rows = count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=name)
        assert rows == 1
        assert count(engine, f"SELECT count(*) FROM {effects} WHERE consumer = :c", c=name) == 1
        if kind == "kafka":
            mine = count(engine, f"SELECT count(*) FROM {inbox} WHERE consumer = :c", c=other)
            assert mine == 1  # the original only: the requeued copy left no inbox row
    finally:
        await rig.close(name)
