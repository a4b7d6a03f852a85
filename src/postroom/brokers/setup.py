"""Declaring what a consumer needs on its broker ahead of time (``postroom broker setup``).

:func:`set_up_consumer` picks the broker from the URL: on RabbitMQ it declares what the
subscriber declares when it starts (:mod:`postroom.brokers.rabbitmq.topology`) plus the
retry queues; on Kafka it creates the handled topics and the dead-letter topic
(:mod:`postroom.brokers.kafka.topics`). Each object gives one :class:`SetupStep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from postroom.brokers.base import SetupStep
from postroom.errors import ConfigurationError


async def set_up_consumer(
    url: str,
    consumer: str,
    topics: Sequence[str],
    *,
    retry_delays: tuple[float, float] | None = None,
    partitions: int | None = None,
    replication_factor: int | None = None,
    dry_run: bool = False,
) -> list[SetupStep]:
    """Declare (idempotently) what ``consumer``, handling ``topics``, needs at ``url``.

    ``retry_delays`` is the shortest and longest wait of a retry (RabbitMQ: their retry
    queues are declared too); ``partitions`` and ``replication_factor`` are for new Kafka
    topics (None: the cluster's defaults). A dry run declares nothing and says what exists.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in {"amqp", "amqps"}:
        from postroom.brokers.rabbitmq.topology import consumer_topology, retry_tiers, set_up

        tiers = retry_tiers(*retry_delays) if retry_delays else []
        return await set_up(url, consumer_topology(consumer, topics, tiers=tiers), dry_run=dry_run)
    if scheme == "kafka":
        from postroom.brokers.base import dead_letter_name
        from postroom.brokers.kafka.topics import set_up_topics

        return await set_up_topics(
            url,
            [*topics, dead_letter_name(consumer)],
            partitions=partitions,
            replication_factor=replication_factor,
            dry_run=dry_run,
        )
    if scheme == "memory":
        return []
    from postroom.brokers import URL_FORMS

    raise ConfigurationError(
        f"the broker URL has the scheme {scheme!r}, which postroom cannot set up; use {URL_FORMS}"
    )
