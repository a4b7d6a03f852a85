"""Kafka topics: which exist, and creating the missing ones (confluent-kafka's AdminClient).

``postroom broker setup`` creates a consumer's topics ahead of time; a relay started with
``--create-topics`` creates each topic before its first publish to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from postroom.brokers.base import CREATED, EXISTS, WOULD_CREATE, SetupStep
from postroom.brokers.kafka.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    REFUSED_CODES,
    _describe,
    _LibrdkafkaLog,
    _log,
    parse_kafka_url,
)
from postroom.errors import BrokerRefusedError, BrokerUnavailableError, ConfigurationError

#: Settings of the consumer or producer alone, which the admin client has no use for.
_NOT_FOR_ADMIN = frozenset(
    {
        "enable.idempotence",
        "acks",
        "message.timeout.ms",
        "partitioner",
        "linger.ms",
        "batch.size",
        "compression.type",
        "auto.offset.reset",
        "session.timeout.ms",
        "max.poll.interval.ms",
        "heartbeat.interval.ms",
        "fetch.max.bytes",
        "max.partition.fetch.bytes",
        "topic.metadata.refresh.interval.ms",
    }
)


@dataclass(frozen=True)
class TopicState:
    """One topic after :meth:`TopicAdmin.ensure`: created now, or there already."""

    name: str
    created: bool
    partitions: int | None
    """Its partition count when it already existed (None when just created)."""


class TopicAdmin:
    """Lists and creates topics on the cluster at ``bootstrap_servers``."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        config: Mapping[str, Any] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        settings = {k: v for k, v in (config or {}).items() if k not in _NOT_FOR_ADMIN}
        settings.update({"bootstrap.servers": bootstrap_servers, "logger": _LibrdkafkaLog()})
        self.bootstrap_servers = bootstrap_servers
        self.connect_timeout = connect_timeout
        try:
            self._admin = AdminClient(settings)
        except KafkaException as exc:
            raise ConfigurationError(
                f"the Kafka admin client rejected its configuration: {_describe(exc.args[0])}"
            ) from None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> TopicAdmin:
        """An admin client for ``kafka://host:port[,host:port][?setting=value]``."""
        servers, settings = parse_kafka_url(url)
        return cls(servers, config=settings, **options)

    async def partitions(self) -> dict[str, int]:
        """Every topic of the cluster with its partition count."""
        try:
            metadata = await asyncio.to_thread(
                self._admin.list_topics, timeout=self.connect_timeout
            )
        except KafkaException as exc:
            raise self._unreachable(exc.args[0]) from None
        return {
            name: len(topic.partitions)
            for name, topic in metadata.topics.items()
            if topic.error is None or topic.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART
        }

    async def ensure(
        self,
        names: Sequence[str],
        *,
        partitions: int | None = None,
        replication_factor: int | None = None,
        known: Mapping[str, int] | None = None,
    ) -> list[TopicState]:
        """Create those of ``names`` that do not exist (``partitions`` and
        ``replication_factor`` None: the cluster's defaults); one state per name, in order.

        ``known`` is the cluster's topics if just read (:meth:`partitions`). A topic that
        another client creates meanwhile counts as existing.
        """
        existing = dict(known) if known is not None else await self.partitions()
        missing = list(dict.fromkeys(name for name in names if name not in existing))
        created: set[str] = set()
        if missing:
            created = await self._create(missing, partitions, replication_factor)
        return [
            TopicState(name, name in created, None if name in created else existing.get(name))
            for name in names
        ]

    async def _create(
        self, names: list[str], partitions: int | None, replication_factor: int | None
    ) -> set[str]:
        topics = [NewTopic(name, partitions or -1, replication_factor or -1) for name in names]
        timeout = self.connect_timeout
        futures = self._admin.create_topics(topics, request_timeout=timeout)
        created: set[str] = set()
        for name, future in futures.items():
            try:
                await asyncio.to_thread(future.result, timeout)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if error.code() in REFUSED_CODES or error.code() in {
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                }:
                    raise BrokerRefusedError(
                        f"Kafka at {self.bootstrap_servers} refused to create topic {name!r} "
                        f"({_describe(error)}); grant the client CREATE on the topic or "
                        "cluster, or have the topic created by an administrator"
                    ) from None
                if error.code() in {
                    KafkaError.INVALID_PARTITIONS,
                    KafkaError.INVALID_REPLICATION_FACTOR,
                    KafkaError.TOPIC_EXCEPTION,
                    KafkaError.INVALID_CONFIG,
                    KafkaError.POLICY_VIOLATION,
                }:
                    raise ConfigurationError(
                        f"Kafka refused to create topic {name!r}: {_describe(error)}; choose "
                        "a partition count and a replication factor the cluster accepts "
                        "(the replication factor cannot exceed the number of brokers)"
                    ) from None
                raise self._unreachable(error) from None
            except TimeoutError:
                raise BrokerUnavailableError(
                    f"Kafka at {self.bootstrap_servers} did not confirm topic {name!r} "
                    f"within {timeout:g} s; check that the brokers run"
                ) from None
            created.add(name)
        return created

    def _unreachable(self, error: KafkaError) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"cannot reach Kafka at {self.bootstrap_servers}: {_describe(error)}; check that "
            "the brokers run and that the broker URL (POSTROOM_BROKER_URL) is right"
        )


async def set_up_topics(
    url: str,
    names: Sequence[str],
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
    dry_run: bool = False,
) -> list[SetupStep]:
    """Create the missing topics of ``names`` (or, in a dry run, say which would be); a
    topic that exists with another partition count than ``partitions`` gets a warning."""
    admin = TopicAdmin.from_url(url)
    known = await admin.partitions()
    if dry_run:
        return [
            SetupStep(f"topic {name}", EXISTS if name in known else WOULD_CREATE) for name in names
        ]
    steps = []
    for state in await admin.ensure(
        names, partitions=partitions, replication_factor=replication_factor, known=known
    ):
        warning = None
        if partitions and state.partitions is not None and state.partitions != partitions:
            warning = (
                f"topic {state.name!r} has {state.partitions} partitions, not {partitions}; "
                "it is left as it is (adding partitions moves keys to other partitions, which "
                "breaks their order: do it, if at all, with kafka-topics --alter while nothing "
                "is published)"
            )
        steps.append(
            SetupStep(f"topic {state.name}", CREATED if state.created else EXISTS, warning)
        )
    return steps


class TopicCreator:
    """Creates each topic a publisher is about to write to, once, if it does not exist.

    Topics seen to exist are remembered, so only a topic not met before costs a metadata
    request. :meth:`ensure` never raises: a refusal (no CREATE permission, a policy) is
    (or an invalid setting) is logged once and the topic is not tried again, an
    unreachable cluster is
    logged and tried again with the next batch; either way the produce that follows
    reports what became of the messages.
    """

    def __init__(self, bootstrap_servers: str, config: Mapping[str, Any]) -> None:
        self._admin = TopicAdmin(bootstrap_servers, config=config)
        self._known: set[str] = set()

    async def ensure(self, topics: Iterable[str]) -> None:
        """Create those of ``topics`` that do not exist (the cluster's default partitions
        and replication factor)."""
        missing = sorted(set(topics) - self._known)
        if not missing:
            return
        try:
            existing = await self._admin.partitions()
            self._known.update(existing)
            for state in await self._admin.ensure(missing, known=existing):
                self._known.add(state.name)
                if state.created:
                    _log.info("topic created", topic=state.name)
        except (BrokerRefusedError, ConfigurationError) as exc:
            self._known.update(missing)  # asking again would be refused again
            _log.warning("topics not created", topics=missing, error=str(exc))
        except BrokerUnavailableError as exc:
            _log.warning("topics not created", topics=missing, error=str(exc))
