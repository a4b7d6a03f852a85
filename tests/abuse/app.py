"""The consumer the abuse cases run: ``postroom consume tests.abuse.app:consumer``.

Three handlers, each writing one effect row per message it runs for (message id, topic,
which handler, pid, body size): ``hostile`` for the topic hostile input arrives on,
``other`` for the ordinary traffic written alongside, and ``decoy``, the handler a spoofed
``postroom-topic`` header names and which must never run for a message routed elsewhere.
A JSON object payload with a true ``"exit"`` ends the process (``os._exit(7)``) mid-handler.

Configured by the environment the harness sets: ``ABUSE_CONSUMER`` (the consumer's name),
``ABUSE_TOPIC``, ``ABUSE_OTHER``, ``ABUSE_DECOY`` and ``ABUSE_EFFECTS`` (a quoted table).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

import postroom

EFFECTS = os.environ["ABUSE_EFFECTS"]
INSERT = text(
    f"INSERT INTO {EFFECTS} (message_id, topic, handler, pid, body_bytes) "
    "VALUES (:id, :topic, :handler, :pid, :size)"
)

consumer = postroom.Consumer(os.environ["ABUSE_CONSUMER"])


def recorder(name: str) -> Callable[[postroom.Message, Session], None]:
    """A handler that records that handler ``name`` ran for the message."""

    def record(message: postroom.Message, session: Session) -> None:
        payload = message.payload
        if isinstance(payload, dict) and payload.get("exit"):
            os._exit(7)  # the process dies mid-handler, before anything commits
        session.execute(
            INSERT,
            {
                "id": str(message.id),
                "topic": message.topic,
                "handler": name,
                "pid": os.getpid(),
                "size": len(message.body),
            },
        )

    return record


consumer.handler(os.environ["ABUSE_TOPIC"])(recorder("hostile"))
consumer.handler(os.environ["ABUSE_OTHER"])(recorder("other"))
consumer.handler(os.environ["ABUSE_DECOY"])(recorder("decoy"))
