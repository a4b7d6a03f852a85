"""The consumer the fault scenarios run: ``postroom consume tests.faults.app:consumer``.

Its handler records one effect row per message (the business write the inbox must keep
single) and then lingers a random moment before its transaction commits, so a SIGKILL
aimed at a busy consumer lands between the write and the commit. The same handler serves
the scenario's topic and its ``.storm`` twin, where duplicate storms arrive under other
keys (and so, on Kafka, on other partitions, handled concurrently).

Configured by the environment the scenario sets: ``FAULTS_CONSUMER`` (the consumer's
name), ``FAULTS_TOPIC``, ``FAULTS_EFFECTS`` (a quoted table name) and
``FAULTS_HANDLER_PAUSE`` (longest linger, in seconds).
"""

from __future__ import annotations

import os
import random
import time

from sqlalchemy import text
from sqlalchemy.orm import Session

import postroom

TOPIC = os.environ["FAULTS_TOPIC"]
STORM_TOPIC = f"{TOPIC}.storm"
EFFECTS = os.environ["FAULTS_EFFECTS"]
PAUSE = float(os.environ.get("FAULTS_HANDLER_PAUSE", "0.005"))
INSERT = text(f"INSERT INTO {EFFECTS} (message_id, topic, pid) VALUES (:id, :topic, :pid)")

consumer = postroom.Consumer(os.environ["FAULTS_CONSUMER"])


def record_effect(message: postroom.Message, session: Session) -> None:
    """Write the effect, flush it to PostgreSQL uncommitted, linger, let the runner commit."""
    session.execute(INSERT, {"id": str(message.id), "topic": message.topic, "pid": os.getpid()})
    session.flush()
    time.sleep(random.uniform(0, PAUSE))


consumer.handler(TOPIC)(record_effect)
consumer.handler(STORM_TOPIC)(record_effect)
