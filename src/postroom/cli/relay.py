"""``postroom relay``: run the relay as a service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
from typing import Any

from postroom.cli.common import (
    allow_insecure_tls,
    configure_service_logging,
    user_errors,
    with_settings,
)
from postroom.config import Settings
from postroom.database import readable_errors
from postroom.lifecycle import run_until_signalled
from postroom.log import get_logger
from postroom.schema.tables import tables_for

RELAY_FIELDS = (
    "broker_url",
    "relay_id",
    "relay_batch_size",
    "relay_batch_bytes",
    "relay_lease",
    "relay_poll_interval",
    "relay_max_attempts",
    "relay_backoff_initial",
    "relay_backoff_max",
    "relay_retention",
    "relay_create_topics",
    "cloudevents",
    "cloudevents_source",
    "metrics_port",
    "metrics_host",
    "health_timeout",
    "log_format",
    "allow_insecure_tls",
)


@with_settings(*RELAY_FIELDS)
def relay(*, settings: Settings) -> None:
    """Publish committed outbox rows to the broker; mark each sent once the broker confirms.

    Run as many as you like: they share the outbox's partitions through leases and keep
    each key in order. SIGTERM or Ctrl-C finishes the batch in flight, releases the
    partitions and exits. Serves /metrics, /healthz and /readyz on --metrics-host
    (127.0.0.1 by default) and --metrics-port (9400 by default). With --create-topics, on
    Kafka, each topic is created before the first publish to it.
    """
    configure_service_logging(settings)
    allow_insecure_tls(settings)
    with user_errors():
        asyncio.run(_run(settings))


async def _run(settings: Settings) -> None:
    from postroom.brokers import publisher_from_url
    from postroom.relay import Relay
    from postroom.schema import grants, migrate
    from postroom.schema.grants import Role

    options: dict[str, Any] = {}
    if settings.relay_create_topics and settings.broker_url.startswith("kafka:"):
        options["create_topics"] = True
    cloudevents = settings.cloudevents_policy()
    if cloudevents is not None and settings.broker_url.startswith("memory:"):
        get_logger("relay").warning(
            "relay.cloudevents_ignored",
            reason="the in-memory broker has no wire format",
            advice="turn POSTROOM_CLOUDEVENTS off, or relay to RabbitMQ or Kafka",
        )
    elif cloudevents is not None:
        options["cloudevents"] = cloudevents
    # a bad URL is said before the database
    publisher = publisher_from_url(settings.broker_url, **options)
    with readable_errors(settings.database_url):
        # The rights first: without them the schema's revision cannot even be read.
        await asyncio.to_thread(
            grants.require_rights, settings.database_url, tables_for(settings), Role.RELAY
        )
        await asyncio.to_thread(
            migrate.require_current, settings.database_url, tables_for(settings), "relay"
        )
    service = Relay(settings, publisher)
    get_logger("relay").info(
        "relay.configured",
        relay=service.relay_id,
        metrics_port=settings.metrics_port_for("relay"),
        **settings.shown("broker_url", "database_url", "schema"),
    )
    await run_until_signalled(service)
