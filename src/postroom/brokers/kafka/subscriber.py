"""Kafka subscriber: a consumer-group member whose offsets are committed only by ack()."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from postroom.brokers.kafka.dead_letters import produce_dead_letter
from postroom.brokers.kafka.lag import partition_lag
from postroom.brokers.kafka.producer import KafkaPublisher
from postroom.brokers.kafka.settings import (
    _CONSUMER_ONLY_SETTINGS,
    _SUBSCRIBER_OWNED,
    DEFAULT_CONNECT_TIMEOUT,
    Partition,
    _describe,
    _LibrdkafkaLog,
    _log,
    parse_kafka_url,
    record_headers,
    record_key,
)
from postroom.errors import BrokerUnavailableError, ConfigurationError, RefusedSettingError

#: How often librdkafka refreshes topic metadata (its default is 5 minutes): a topic
#: created after the consumer started is picked up within this time.
METADATA_REFRESH_MS = 10_000
#: Longest wait of a fetch for data (librdkafka's default is 500 ms). A partition resumed
#: after its prefetch ran full is fetched again only once the fetch in flight returns, so
#: with the default a busy consumer stalled up to half a second per partition every
#: ``prefetch`` records (measured: 430 against 870-1,390 msg/s). A URL option overrides it.
FETCH_WAIT_MAX_MS = 100
#: Seconds between checks for subscribed topics that do not exist (yet).
MISSING_TOPIC_CHECK = 5.0
#: Largest dead-letter copy librdkafka's producer accepts (``message.max.bytes`` maximum).
_LIBRDKAFKA_MAX_MESSAGE_BYTES = 1_000_000_000
#: Errors that mean Kafka refused this client: misconfiguration, not an outage.
_REFUSED = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError._SSL,
    }
)
#: Room for the dead-letter headers beyond the consumer's largest message.
_DEAD_LETTER_HEADROOM = 1024 * 1024


class KafkaDelivery:
    """One record of a partition; its ack commits the offset after it (in partition order)."""

    redeliverable = False

    def __init__(
        self, subscriber: KafkaSubscriber, record: Any, epoch: int, *, redelivered: bool = False
    ) -> None:
        from postroom.brokers.base import attempts_made

        self._subscriber = subscriber
        self.redelivered = redelivered
        """True for the first record handed out from its partition after an assignment."""
        self.partition: int = record.partition()
        self.offset: int = record.offset()
        self.topic: str = record.topic()
        self.lane: object = (self.topic, self.partition)
        self.epoch: int | None = epoch
        self.key: str | None = record_key(record)
        self.body: bytes = record.value() or b""
        self.headers: dict[str, str] = record_headers(record)
        self.broker_message_id: str | None = None
        self.content_type: str | None = None
        self.attempt = attempts_made(self.headers) + 1

    @property
    def revoked(self) -> bool:
        """True once this consumer lost the partition the record came from."""
        return not self._subscriber._owns(self)

    async def ack(self) -> None:
        """Commit the offset after this record (skipped if the partition was revoked)."""
        await self._subscriber._commit(self)

    def settle_for_later_ack(self) -> None:
        """Count it settled without an offset commit (the commit of a later record of its
        partition covers it)."""
        if self._subscriber._owns(self):
            self._subscriber._settled((self.topic, self.partition))

    async def release(self) -> bool:
        """Give it back unsettled: seek its partition back to it, so it and every later
        record come again (the ones in hand become stale). False if that failed."""
        return self._subscriber._rewind(self)

    async def retry_later(self, delay: float, error: str) -> None:
        """Not supported: a partition is retried in place to keep its order."""
        raise NotImplementedError("Kafka deliveries are retried in place")

    async def dead_letter(self, error: str, attempts: int) -> None:
        """Produce a copy (acks=all, confirmed) to ``<consumer>.dead-letter``, then commit."""
        await self._subscriber._dead_letter(self, error, attempts)
        await self.ack()


def _cooperative(settings: Mapping[str, Any]) -> str | None:
    """The setting that asks for incremental (cooperative) rebalancing, named, if any."""
    strategy = str(settings.get("partition.assignment.strategy", ""))
    if "cooperative" in strategy.lower():
        return f"partition.assignment.strategy={strategy}"
    protocol = str(settings.get("group.protocol", "classic"))
    if protocol.strip().lower() != "classic":
        return f"group.protocol={protocol}"
    return None


class KafkaSubscriber:
    """A consumer-group member: group ``<consumer>``, offsets committed only by ack().

    Every call on the librdkafka consumer is made from the event loop's thread, and none
    blocks it: a task polls with a zero timeout (pausing briefly when nothing came), and
    commits are asynchronous. (The Python client does not let one thread commit while
    another is inside ``consume()``.) ``enable.auto.commit`` is off; each ack commits
    ``offset + 1`` of its record, and acks of a partition come in order (the runner handles
    a partition one record at a time), so a committed offset never passes an unhandled
    record. A partition with ``prefetch`` records in hand is paused, and resumed from the
    first record it did not hand out. Nothing is committed for a partition after it was
    revoked or lost. New groups start at the earliest offset.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        config: Mapping[str, Any] | None = None,
        prefetch: int = 32,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_poll_interval: float = 0.01,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        settings = dict(config or {})
        owned = sorted(_SUBSCRIBER_OWNED & settings.keys())
        if owned:
            raise ConfigurationError(
                f"the Kafka subscriber sets {', '.join(owned)} itself; remove them "
                "(the group id is the consumer's name)"
            )
        cooperative = _cooperative(settings)
        if cooperative:
            raise ConfigurationError(
                f"the Kafka subscriber does not support {cooperative}: it keeps each partition "
                "in order across rebalances with the eager protocol; remove the setting (the "
                "default range,roundrobin assignors are eager)"
            )
        self.bootstrap_servers = bootstrap_servers
        self.prefetch = max(1, prefetch)
        self.connect_timeout = connect_timeout
        self.idle_poll_interval = idle_poll_interval
        self.max_message_bytes = max_message_bytes
        """The consumer's largest message: the dead-letter producer's ``message.max.bytes``
        follows it (with room for the dead-letter headers)."""
        self._settings = settings
        self._topics: list[str] = []
        self._missing: set[str] = set()
        self._fresh: set[Partition] = set()
        self._assign_failed: Exception | None = None
        self._refused: KafkaError | None = None
        self.group = ""
        self._dead_letter_topic = ""
        self._consumer: Any = None
        self._publisher: KafkaPublisher | None = None
        self._queue: asyncio.Queue[KafkaDelivery] = asyncio.Queue()
        self._epochs: dict[Partition, int] = {}
        self._assigned: set[Partition] = set()
        self._outstanding: dict[Partition, int] = {}
        self._paused: dict[Partition, int] = {}
        self._next_offset: dict[Partition, int] = {}
        # A jump past the next offset is fetched again once from where it should go on
        # (``_gaps``: the offset asked for again); the rest of that fetch is left alone
        # (``_refetching``, emptied on every consume()).
        self._gaps: dict[Partition, int] = {}
        self._refetching: set[Partition] = set()
        self._poller: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaSubscriber:
        """A subscriber for ``kafka://host:port[?setting=value]``."""
        servers, settings = parse_kafka_url(url)
        config = {**settings, **options.pop("config", {})}
        return cls(servers, config=config, **options)

    def __repr__(self) -> str:
        return f"KafkaSubscriber({self.bootstrap_servers!r}, group={self.group!r})"

    async def start(self, consumer: str, topics: Sequence[str]) -> None:
        """Join group ``consumer`` subscribed to ``topics``; raise if Kafka does not answer."""
        from postroom.brokers.base import dead_letter_name

        self.group = consumer
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
            **self._settings,
            "group.id": consumer,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "logger": _LibrdkafkaLog(),
            "error_cb": self._on_error,
        }
        try:
            kafka_consumer = confluent_kafka.Consumer(config)
        except KafkaException as exc:
            raise ConfigurationError(
                "the Kafka consumer rejected its configuration: "
                f"{self._hide_secrets(_describe(exc.args[0]))}"
            ) from None
        try:
            metadata = await asyncio.to_thread(
                kafka_consumer.list_topics, timeout=self.connect_timeout
            )
        except KafkaException as exc:
            # A refused login shows in list_topics only as a transport failure; the reason
            # comes through error_cb, which poll() serves.
            with contextlib.suppress(KafkaException, RuntimeError):
                kafka_consumer.poll(0)
            await asyncio.to_thread(kafka_consumer.close)
            error = exc.args[0]
            if error.code() not in _REFUSED and self._refused is not None:
                error = self._refused
            if error.code() in _REFUSED:
                raise RefusedSettingError(
                    f"Kafka at {self.bootstrap_servers} refused the consumer "
                    f"({self._hide_secrets(_describe(error))}); check the SASL/SSL settings "
                    "of the broker URL (POSTROOM_BROKER_URL)"
                ) from None
            raise BrokerUnavailableError(
                f"cannot reach Kafka at {self.bootstrap_servers}: "
                f"{self._hide_secrets(_describe(error))}; "
                "check that the brokers run and the broker URL (POSTROOM_BROKER_URL) is right"
            ) from None
        producer_config = {
            k: v for k, v in self._settings.items() if k not in _CONSUMER_ONLY_SETTINGS
        }
        producer_config.setdefault(
            "message.max.bytes",
            min(_LIBRDKAFKA_MAX_MESSAGE_BYTES, self.max_message_bytes + _DEAD_LETTER_HEADROOM),
        )
        self._topics = list(topics)
        self._note_missing(metadata)
        self._publisher = KafkaPublisher(self.bootstrap_servers, config=producer_config)
        self._dead_letter_topic = dead_letter_name(consumer)
        kafka_consumer.subscribe(
            list(topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        self._consumer = kafka_consumer
        self._closed.clear()
        self._poller = asyncio.create_task(self._poll_forever(), name="postroom-kafka-poll")
        _log.info("subscribed", brokers=self.bootstrap_servers, group=consumer, topics=topics)

    async def deliveries(self) -> AsyncIterator[KafkaDelivery]:
        """The records, in order per partition, until close()."""
        while not self._closed.is_set():
            try:
                async with asyncio.timeout(0.5):
                    delivery = await self._queue.get()
            except TimeoutError:
                self._raise_if_polling_died()
                continue
            if self._owns(delivery):
                yield delivery

    def _raise_if_polling_died(self) -> None:
        """Raise what ended the polling task, if it ended: no record would come again."""
        poller = self._poller
        if poller is not None and poller.done() and not poller.cancelled():
            error = poller.exception()
            if error is not None:
                raise error

    async def close(self) -> None:
        """Stop polling and leave the group (nothing more is committed), close the producer."""
        self._closed.set()
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                await asyncio.to_thread(consumer.close)
        self._assigned.clear()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error callback: remember a refusal (authentication, authorization)."""
        if error.code() in _REFUSED:
            self._refused = error

    async def lag(self) -> dict[tuple[str, int | None], int]:
        """Per assigned partition: its high watermark minus the offset of the first record
        not yet acknowledged (see :func:`partition_lag`); empty unless subscribed."""
        if self._consumer is None or self._closed.is_set():
            return {}
        handed = self._next_offset.items()
        first = {key: offset - self._outstanding.get(key, 0) for key, offset in handed}
        lag = partition_lag(self._consumer, sorted(self._assigned), first)
        return {(topic, partition): count for (topic, partition), count in lag.items()}

    def missing_topics(self) -> list[str]:
        """Subscribed topics Kafka does not know (yet); checked every few seconds."""
        return sorted(self._missing)

    def _note_missing(self, metadata: Any) -> None:
        missing = {topic for topic in self._topics if topic not in metadata.topics}
        if missing and missing != self._missing:
            _log.warning(
                "subscribed topics do not exist",
                group=self.group,
                topics=sorted(missing),
                advice="create them; the consumer picks them up within "
                f"{METADATA_REFRESH_MS // 1000} s of their creation and is not ready until then",
            )
        elif self._missing and not missing:
            _log.info("subscribed topics exist now", group=self.group, topics=sorted(self._missing))
        self._missing = missing

    async def _check_missing(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._missing:
            return
        try:
            metadata = await asyncio.to_thread(consumer.list_topics, timeout=self.connect_timeout)
        except (KafkaException, RuntimeError) as exc:
            _log.warning("Kafka metadata request failed", error=str(exc))
            return
        self._note_missing(metadata)

    def _hide_secrets(self, text: str) -> str:
        """``text`` with the values of secret-looking settings (``sasl.password``, ...)
        replaced by ``***``; librdkafka may quote the configuration it rejects."""
        from postroom.urls import HIDDEN, looks_secret

        for name, value in self._settings.items():
            if looks_secret(name) and len(str(value)) >= 3:
                text = text.replace(str(value), HIDDEN)
        return text

    async def _poll_forever(self) -> None:
        checked = time.monotonic()
        while True:
            if self._missing and time.monotonic() - checked > MISSING_TOPIC_CHECK:
                checked = time.monotonic()
                await self._check_missing()
            consumer = self._consumer
            if consumer is None:
                return
            self._refetching.clear()
            try:
                records = consumer.consume(num_messages=500, timeout=0)
            except (KafkaException, RuntimeError) as exc:
                _log.warning("Kafka consume failed", error=str(exc))
                records = []
            if self._assign_failed is not None:
                raise BrokerUnavailableError(
                    f"Kafka partitions could not be taken over ({self._assign_failed}); the "
                    "consumer stops so that a restart joins the group afresh"
                )
            for record in records:
                error = record.error()
                if error is None:
                    self._accept(record)
                elif error.code() != KafkaError._PARTITION_EOF:
                    _log.warning("Kafka consumer error", error=_describe(error))
            await asyncio.sleep(0 if records else self.idle_poll_interval)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        # librdkafka keeps a partition's pause across a revoke and a re-assignment, while
        # each assignment starts afresh here: one paused before would never deliver again.
        try:
            consumer.assign(partitions)
            consumer.resume(partitions)
        except (KafkaException, RuntimeError) as exc:
            # Not assigned, or still paused: these partitions would never deliver. The
            # poll loop raises it, so the consumer stops loudly instead of idling.
            self._assign_failed = exc
            return
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.add(key)
            # A lane is handled in order, one record at a time: if a previous owner of this
            # partition died inside a handler, that was its first uncommitted record, which
            # is the first one handed out here. So that one (only) counts as redelivered.
            self._fresh.add(key)
            self._epochs[key] = self._epochs.get(key, 0) + 1
            self._reset(key)
        _log.info("partitions assigned", group=self.group, partitions=_names(partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.discard(key)
            self._fresh.discard(key)
            self._epochs[key] = self._epochs.get(key, 0) + 1
            self._reset(key)
        _log.info("partitions revoked", group=self.group, partitions=_names(partitions))

    def _reset(self, key: Partition) -> None:
        self._outstanding.pop(key, None)
        self._paused.pop(key, None)
        self._next_offset.pop(key, None)
        self._gaps.pop(key, None)

    def _accept(self, record: Any) -> None:
        key = (record.topic(), record.partition())
        offset = record.offset()
        if key not in self._assigned or key in self._paused or key in self._refetching:
            return
        expected = self._next_offset.get(key, -1)
        if offset < expected:
            return  # fetched again after a pause; already handed out
        if 0 <= expected < offset and self._skipped_gap(key, expected, offset):
            return
        if self._outstanding.get(key, 0) >= self.prefetch:
            self._pause(key, offset)
            return
        self._next_offset[key] = offset + 1
        self._outstanding[key] = self._outstanding.get(key, 0) + 1
        redelivered = key in self._fresh
        self._fresh.discard(key)
        self._queue.put_nowait(
            KafkaDelivery(self, record, self._epochs.get(key, 0), redelivered=redelivered)
        )

    def _skipped_gap(self, key: Partition, expected: int, offset: int) -> bool:
        """True when a record past a hole in the partition is left for a second fetch.

        A broker may answer a fetch with a later batch while an earlier one is still
        being written (seen on a Kafka-compatible broker under concurrent producers):
        handing the later records out would commit past the missing ones for good. So
        the first jump past ``expected`` fetches again from there; a jump that is still
        there on the second fetch is a real hole (compacted records, transaction
        markers) and is gone through.
        """
        if self._gaps.get(key) == expected:
            del self._gaps[key]
            _log.info("Kafka offset gap kept", partition=key, expected=expected, got=offset)
            return False
        try:
            self._consumer.seek(confluent_kafka.TopicPartition(key[0], key[1], expected))
        except (KafkaException, RuntimeError) as exc:
            # Without the seek the next fetch goes on past the hole: dropping the rest of
            # this one would lose it for good, so it is handed out as it came.
            _log.warning("Kafka seek back failed", partition=key, error=str(exc))
            return False
        self._gaps[key] = expected
        self._refetching.add(key)
        _log.info(
            "Kafka offset gap",
            partition=key,
            expected=expected,
            got=offset,
            action="fetching the partition again from the expected offset",
        )
        return True

    def _pause(self, key: Partition, offset: int) -> None:
        self._paused[key] = offset
        with contextlib.suppress(KafkaException, RuntimeError):
            self._consumer.pause([confluent_kafka.TopicPartition(key[0], key[1])])

    def _settled(self, key: Partition) -> None:
        left = max(0, self._outstanding.get(key, 0) - 1)
        self._outstanding[key] = left
        resume_at = self._paused.get(key)
        if resume_at is not None and left <= self.prefetch // 2:
            del self._paused[key]
            try:
                self._consumer.seek(confluent_kafka.TopicPartition(key[0], key[1], resume_at))
                self._consumer.resume([confluent_kafka.TopicPartition(key[0], key[1])])
            except (KafkaException, RuntimeError) as exc:
                _log.warning("Kafka resume failed", partition=key, error=str(exc))

    def _rewind(self, delivery: KafkaDelivery) -> bool:
        key = (delivery.topic, delivery.partition)
        consumer = self._consumer
        if consumer is None or not self._owns(delivery):
            return True  # not ours any more: its new owner reads from the committed offset
        try:
            consumer.seek(
                confluent_kafka.TopicPartition(delivery.topic, delivery.partition, delivery.offset)
            )
        except (KafkaException, RuntimeError) as exc:
            _log.warning("Kafka seek back failed", partition=key, error=str(exc))
            return False
        # The records handed out after it are now stale (never acked); fetch them again.
        self._epochs[key] = self._epochs.get(key, 0) + 1
        self._reset(key)
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.resume([confluent_kafka.TopicPartition(delivery.topic, delivery.partition)])
        _log.info("partition rewound", partition=key, offset=delivery.offset)
        return True

    def _owns(self, delivery: KafkaDelivery) -> bool:
        key = (delivery.topic, delivery.partition)
        return key in self._assigned and self._epochs.get(key) == delivery.epoch

    async def _commit(self, delivery: KafkaDelivery) -> None:
        key = (delivery.topic, delivery.partition)
        consumer = self._consumer
        if consumer is None or not self._owns(delivery):
            _log.info("commit skipped: partition revoked", partition=key, offset=delivery.offset)
            return
        self._settled(key)
        tp = confluent_kafka.TopicPartition(delivery.topic, delivery.partition, delivery.offset + 1)
        try:
            # The first record after an assignment is committed synchronously (once per
            # assignment): an asynchronous commit can be lost when the process dies right
            # after it, and then the next owner's first record would not be the one that
            # was in the handler, which would escape the redelivery count.
            consumer.commit(offsets=[tp], asynchronous=not delivery.redelivered)
        except KafkaException as exc:
            raise BrokerUnavailableError(
                f"Kafka did not take the offset commit: {_describe(exc.args[0])}"
            ) from None

    async def _dead_letter(self, delivery: KafkaDelivery, error: str, attempts: int) -> None:
        assert self._publisher is not None
        await produce_dead_letter(
            self._publisher, self._dead_letter_topic, delivery, self.group, error, attempts
        )


def _names(partitions: list[Any]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
