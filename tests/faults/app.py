"""The consumer the fault scenarios run: ``postroom consume tests.faults.app:consumer``.

Its handler records one effect row per message (the business write the inbox must keep
single) and then lingers a random moment before its transaction commits, so a SIGKILL
aimed at a busy consumer lands between the write and the commit. The same handler serves
the scenario's topic and its ``.storm`` twin, where duplicate storms arrive under other
keys (and so, on Kafka, on other partitions, handled concurrently).

Configured by the environment the scenario sets: ``FAULTS_CONSUMER`` (the consumer's
name), ``FAULTS_TOPIC``, ``FAULTS_EFFECTS`` (a quoted table name) and
``FAULTS_HANDLER_PAUSE`` (longest linger, in seconds). With ``FAULTS_RUN_LOG`` (a file)
the handler is ``async def``, so the consumer batches it (``POSTROOM_CONSUMER_BATCH_SIZE``),
and each run appends its transaction id and message id to that file once its effect is
written.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom

TOPIC = os.environ["FAULTS_TOPIC"]
STORM_TOPIC = f"{TOPIC}.storm"
EFFECTS = os.environ["FAULTS_EFFECTS"]
PAUSE = float(os.environ.get("FAULTS_HANDLER_PAUSE", "0.005"))
RUN_LOG = os.environ.get("FAULTS_RUN_LOG")
CURRENT_XID = text("SELECT pg_current_xact_id()::xid::text")
INSERT = text(f"INSERT INTO {EFFECTS} (message_id, topic, pid) VALUES (:id, :topic, :pid)")

consumer = postroom.Consumer(os.environ["FAULTS_CONSUMER"])


def record_effect(message: postroom.Message, session: Session) -> None:
    """Write the effect, flush it to PostgreSQL uncommitted, linger, let the runner commit."""
    session.execute(INSERT, {"id": str(message.id), "topic": message.topic, "pid": os.getpid()})
    session.flush()
    time.sleep(random.uniform(0, PAUSE))


async def record_effect_batched(message: postroom.Message, session: AsyncSession) -> None:
    """:func:`record_effect` for a batch: the effect, the transaction id logged, a linger."""
    await session.execute(
        INSERT, {"id": str(message.id), "topic": message.topic, "pid": os.getpid()}
    )
    xid = (await session.execute(CURRENT_XID)).scalar_one()
    assert RUN_LOG is not None
    with open(RUN_LOG, "a") as runs:  # noqa: ASYNC230 (a line in a local file)
        runs.write(f"{xid} {message.id}\n")
    await asyncio.sleep(random.uniform(0, PAUSE))


handler = record_effect if RUN_LOG is None else record_effect_batched
consumer.handler(TOPIC)(handler)
consumer.handler(STORM_TOPIC)(handler)
