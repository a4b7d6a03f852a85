"""Small consumer apps written to disk, for ``postroom`` commands run as processes.

:func:`write_consumer_app` writes a module whose Consumer is named by ``TEST_CONSUMER`` and
handles the comma-separated ``TEST_TOPICS`` with a handler that does nothing;
:func:`app_env` is the environment that makes the command find and configure it.
:func:`kafka_topics` and :func:`delete_kafka_topics` look at and clean up Kafka topics.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.services import QuietLog

CONSUMER_APP = textwrap.dedent(
    """
    import os

    import postroom

    consumer = postroom.Consumer(os.environ["TEST_CONSUMER"])

    for topic in filter(None, os.environ["TEST_TOPICS"].split(",")):
        consumer.handler(topic)(lambda message, session: None)
    """
)


def write_consumer_app(directory: Path, module: str) -> None:
    """Write ``module``.py (a Consumer configured by ``TEST_*`` variables) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(CONSUMER_APP)


def app_env(directory: Path, consumer: str, topics: Sequence[str], **more: str) -> dict[str, str]:
    """The environment under which a command imports the app in ``directory``."""
    return {
        "PYTHONPATH": str(directory),
        "TEST_CONSUMER": consumer,
        "TEST_TOPICS": ",".join(topics),
        **more,
    }


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": QuietLog()}
    return AdminClient(config)


def kafka_topics(bootstrap: str) -> dict[str, int]:
    """Every topic on the cluster with its partition count."""
    metadata = _admin(bootstrap).list_topics(timeout=10)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


def delete_kafka_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Delete ``topics`` (those that do not exist are skipped)."""
    existing = kafka_topics(bootstrap)
    doomed = [topic for topic in topics if topic in existing]
    if doomed:
        admin = _admin(bootstrap)  # held until the results are in
        for future in admin.delete_topics(doomed, request_timeout=15).values():
            future.result(15)
