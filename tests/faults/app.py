"""The consumer the fault scenarios run: ``postroom consume tests.faults.app:consumer``.

Its handler records one effect row per message (the business write the inbox must keep
single) and then lingers a random moment before its transaction commits, so a SIGKILL
aimed at a busy consumer lands between the write and the commit. The same handler serves
the scenario's topic and its ``.storm`` twin, where duplicate storms arrive under other
keys (and so, on Kafka, on other partitions, handled concurrently).

Configured by the environment the scenario sets: ``FAULTS_CONSUMER`` (the consumer's
name), ``FAULTS_TOPIC``, ``FAULTS_EFFECTS`` (a quoted table name) and
``FAULTS_HANDLER_PAUSE`` (longest linger, in seconds). The handler is ``async def``, so
the consumer handles it in batches at its default settings (``POSTROOM_CONSUMER_BATCH_SIZE``);
with ``FAULTS_RUN_LOG`` (a file) each run appends its transaction id and message id to that
file once its effect is written.
"""

from __future__ import annotations

import asyncio
import os
import random

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

import postroom

TOPIC = os.environ["FAULTS_TOPIC"]
STORM_TOPIC = f"{TOPIC}.storm"
EFFECTS = os.environ["FAULTS_EFFECTS"]
PAUSE = float(os.environ.get("FAULTS_HANDLER_PAUSE", "0.005"))
RUN_LOG = os.environ.get("FAULTS_RUN_LOG")
CURRENT_XID = text("SELECT pg_current_xact_id()::xid::text")
INSERT = text(f"INSERT INTO {EFFECTS} (message_id, topic, pid) VALUES (:id, :topic, :pid)")

consumer = postroom.Consumer(os.environ["FAULTS_CONSUMER"])


async def record_effect(message: postroom.Message, session: AsyncSession) -> None:
    """Write the effect, flush it to PostgreSQL uncommitted, linger, let the runner commit
    (with ``FAULTS_RUN_LOG``, log the transaction id first)."""
    await session.execute(
        INSERT, {"id": str(message.id), "topic": message.topic, "pid": os.getpid()}
    )
    await session.flush()
    if RUN_LOG is not None:
        xid = (await session.execute(CURRENT_XID)).scalar_one()
        with open(RUN_LOG, "a") as runs:  # noqa: ASYNC230 (a line in a local file)
            runs.write(f"{xid} {message.id}\n")
    await asyncio.sleep(random.uniform(0, PAUSE))


consumer.handler(TOPIC)(record_effect)
consumer.handler(STORM_TOPIC)(record_effect)
