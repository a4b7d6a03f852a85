"""``postroom broker setup module:attribute``: declare what a consumer needs on its broker."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from postroom.backoff import Backoff
from postroom.cli.common import user_errors, with_settings
from postroom.cli.consume import load_consumer
from postroom.cli.options import DryRun
from postroom.cli.output import say, warn
from postroom.config import MAX_SETTING_INT, Settings
from postroom.consumer.runner import check_settings
from postroom.log import configure_logging

app = typer.Typer(
    help="Prepare the broker: declare a consumer's queues or create its topics ahead of time.",
    no_args_is_help=True,
)

Partitions = Annotated[
    int | None,
    typer.Option(
        "--partitions",
        envvar="POSTROOM_BROKER_PARTITIONS",
        min=1,
        max=MAX_SETTING_INT,
        show_default=False,
        help="Kafka: partitions of each topic created (default: the cluster's num.partitions). "
        "An existing topic with another count is left as it is, with a warning.",
    ),
]
ReplicationFactor = Annotated[
    int | None,
    typer.Option(
        "--replication-factor",
        envvar="POSTROOM_BROKER_REPLICATION_FACTOR",
        min=1,
        max=MAX_SETTING_INT,
        show_default=False,
        help="Kafka: replicas of each topic created (default: the cluster's "
        "default.replication.factor); at most the number of brokers.",
    ),
]


def retry_delays(settings: Settings) -> tuple[float, float] | None:
    """The shortest and longest wait before a consumer's retry under ``settings`` (None
    when it never retries: a first failure is its last attempt)."""
    retries = settings.consumer_max_attempts - 1
    if retries < 1:
        return None
    backoff = Backoff(settings.consumer_backoff_initial, settings.consumer_backoff_max)
    # A delay is drawn from the upper half of the nominal one (see Backoff.delay).
    return backoff.nominal(1) / 2, max(backoff.nominal(n) for n in range(1, retries + 1))


@app.command()
@with_settings(
    "broker_url",
    "consumer_max_attempts",
    "consumer_backoff_initial",
    "consumer_backoff_max",
    database=False,
)
def setup(
    target: Annotated[
        str,
        typer.Argument(
            help="The Consumer to set up for, as module:attribute (e.g. myapp.billing:consumer)."
        ),
    ],
    partitions: Partitions = None,
    replication_factor: ReplicationFactor = None,
    dry_run: DryRun = False,
    *,
    settings: Settings,
) -> None:
    """Declare what a consumer needs on the broker, before it or the relay runs; idempotent.

    RabbitMQ: the durable topic exchange `postroom`, the consumer's durable queue bound to
    it for each handled topic, its retry queues (for --consumer-max-attempts and the
    backoff options) and its dead-letter queue: the same declarations `postroom consume`
    makes. Kafka: each handled topic and NAME.dead-letter. One line per object: created,
    exists, bound (a binding on a queue that existed), or, with --dry-run (which declares
    nothing), would create / would bind. Exit 2 for a malformed target or a bad option, 3
    when its module is not found or the broker cannot be reached or refuses.
    """
    with user_errors():
        check_settings(settings)  # a bad option is said before the module is imported
        consumer = load_consumer(target)
    from postroom.brokers.setup import set_up_consumer

    # The client libraries' own log lines would repeat the one error sentence below.
    configure_logging(json=False, level="critical")
    with user_errors():
        steps = asyncio.run(
            set_up_consumer(
                settings.broker_url,
                consumer.name,
                consumer.topics,
                retry_delays=retry_delays(settings),
                partitions=partitions,
                replication_factor=replication_factor,
                dry_run=dry_run,
            )
        )
    if not consumer.topics:
        warn(
            f"warning: consumer {consumer.name!r} has no handlers; register one with "
            "@consumer.handler(topic) so it has topics to bind or create"
        )
    if not steps:
        say("memory:// brokers live inside one process; nothing to declare")
    for step in steps:
        say(f"{step.what}: {step.state}")
        if step.warning:
            warn(f"warning: {step.warning}")
    if dry_run:
        warn("dry run: nothing was declared")
