"""Kafka publisher: an idempotent confluent-kafka producer with ``acks=all``, bridged to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from postroom.brokers.base import CONFIRMED, Outcome, PublishResult
from postroom.errors import BrokerUnavailableError, ConfigurationError, MissingExtraError
from postroom.log import get_logger
from postroom.message import Message
from postroom.urls import redact_url

try:
    import confluent_kafka
    from confluent_kafka import KafkaError, KafkaException
except ImportError:
    raise MissingExtraError("confluent-kafka", "kafka") from None

#: Port assumed for a broker given without one in a ``kafka://`` URL.
DEFAULT_PORT: Final = 9092
#: ``message.timeout.ms``: how long librdkafka retries a message before giving up.
DEFAULT_MESSAGE_TIMEOUT_MS: Final = 30_000
#: Seconds connect() waits for the cluster's metadata.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: Extra seconds to wait for delivery reports after ``message.timeout.ms``.
DELIVERY_GRACE: Final = 5.0
_POLL_SECONDS: Final = 0.1
_METADATA_SLICE_SECONDS: Final = 0.5

#: Settings postroom sets itself: the delivery guarantees and the callbacks it relies on.
_OWNED_SETTINGS: Final = frozenset(
    {"error_cb", "logger", "on_delivery", "delivery.report.only.error"}
)

_UNAVAILABLE_CODES: Final = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._UNKNOWN_BROKER,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError._DESTROY,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._QUEUE_FULL,
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError._STATE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.KAFKA_STORAGE_ERROR,
        KafkaError.THROTTLING_QUOTA_EXCEEDED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        # The idempotent producer's own state, e.g. a broker that lost it on restart.
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.PRODUCER_FENCED,
    }
)
_REJECTED_CODES: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)

_log = get_logger("brokers.kafka")


def parse_kafka_url(url: str) -> tuple[str, dict[str, str]]:
    """Split ``kafka://host:port,host2:port?setting=value`` into bootstrap servers and settings.

    A missing port means 9092. Query parameters are librdkafka settings (e.g.
    ``?security.protocol=SSL``). Credentials belong in settings, not in the URL.
    """
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ConfigurationError(
            f"a Kafka URL must start with kafka:// (this one has scheme {parts.scheme!r}), "
            "e.g. kafka://host:9092,host2:9092"
        )
    if "@" in parts.netloc:
        raise ConfigurationError(
            "Kafka URLs take no user or password; pass sasl.username and sasl.password "
            "in the publisher's config"
        )
    servers = [_server(item.strip(), url) for item in parts.netloc.split(",") if item.strip()]
    if not servers:
        raise ConfigurationError("Kafka URL names no broker; use kafka://host:9092[,host2:9092]")
    if parts.path not in {"", "/"}:
        raise ConfigurationError(
            f"Kafka URL {redact_url(url)!r} has a path; use kafka://host:9092[,host2:9092]"
        )
    return ",".join(servers), dict(parse_qsl(parts.query, keep_blank_values=True))


def _server(item: str, url: str) -> str:
    host, port = item, ""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        host = f"[{host}]"
        port = rest.removeprefix(":")
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not port:
        port = str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"Kafka URL {redact_url(url)!r} has an invalid broker address {item!r}; use host:port"
        )
    return f"{host}:{port}"


class KafkaPublisher:
    """Publishes with an idempotent producer (``enable.idempotence``, ``acks=all``).

    Record key = the message key (UTF-8, none without a key), topic = the message topic,
    value = the body, headers = the postroom and user headers, timestamp = ``created_at``.
    Delivery reports are served by a poll thread and resolve asyncio futures. A message
    that is not delivered within ``message.timeout.ms`` is UNAVAILABLE; a producer that
    failed fatally is replaced on the next publish. The default partitioner is
    ``murmur2_random``, which places keys on the same partitions as the Java client.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        message_timeout_ms: int = DEFAULT_MESSAGE_TIMEOUT_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        servers = (
            bootstrap_servers if isinstance(bootstrap_servers, str) else ",".join(bootstrap_servers)
        )
        if not servers.strip():
            raise ConfigurationError("bootstrap_servers is empty; give host:port[,host2:port]")
        if not connect_timeout > 0:
            raise ConfigurationError(
                f"connect_timeout must be a positive number of seconds, got {connect_timeout}"
            )
        settings: dict[str, Any] = {
            "bootstrap.servers": servers,
            "client.id": "postroom",
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": message_timeout_ms,
            "partitioner": "murmur2_random",
            "log.connection.close": False,
        }
        overrides = dict(config or {})
        owned = sorted(_OWNED_SETTINGS.intersection(overrides))
        if owned:
            raise ConfigurationError(f"config may not set {', '.join(owned)}; postroom sets them")
        settings.update(overrides)
        if str(settings["enable.idempotence"]).lower() not in {"true", "1"}:
            raise ConfigurationError(
                "enable.idempotence must stay true: without it a retried send can duplicate "
                "or reorder messages of a key"
            )
        if str(settings["acks"]).lower() not in {"all", "-1"}:
            raise ConfigurationError(
                f"acks={settings['acks']!r} would let a broker failure lose confirmed "
                "messages; leave acks at 'all'"
            )
        try:
            timeout_ms = int(settings["message.timeout.ms"])
        except (TypeError, ValueError):
            timeout_ms = 0
        if timeout_ms <= 0:
            raise ConfigurationError(
                "message.timeout.ms must be a positive number of milliseconds (0 would wait "
                f"forever in an outage), got {settings['message.timeout.ms']!r}"
            )
        self.bootstrap_servers = servers
        """The brokers first contacted, ``host:port[,host:port]``."""
        self.message_timeout = timeout_ms / 1000
        """Seconds after which an undelivered message is reported UNAVAILABLE."""
        self.connect_timeout = connect_timeout
        """Seconds connect() waits for the cluster to answer."""
        self._settings = settings
        self._producer: _Producer | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(
        cls, url: str, *, config: Mapping[str, Any] | None = None, **options: Any
    ) -> KafkaPublisher:
        """A publisher for ``kafka://host:port[,host:port][?setting=value]``."""
        servers, settings = parse_kafka_url(url)
        return cls(servers, config={**settings, **(config or {})}, **options)

    def __repr__(self) -> str:
        return f"KafkaPublisher({self.bootstrap_servers!r})"

    async def connect(self) -> None:
        """Start the producer and check that the cluster answers a metadata request.

        Raises BrokerUnavailableError (naming the brokers and the reason) if it does not
        answer within ``connect_timeout`` or every broker refuses the connection.
        """
        async with self._lock:
            producer = await self._ensure_producer()
            try:
                await self._check_cluster(producer)
            except BrokerUnavailableError:
                self._producer = None
                await producer.shutdown(flush_timeout=0)
                raise

    async def publish(self, batch: Sequence[Message]) -> list[PublishResult]:
        """Produce ``batch`` in order and return one result per message from its delivery report.

        The delivery reports of the batch are counted on the poll thread into one
        :class:`_Reports` object, which wakes this coroutine once, when the last arrives.
        """
        if not batch:
            return []
        async with self._lock:
            producer = await self._ensure_producer()
        reports = _Reports(producer, batch)
        producer.pending.add(reports)
        try:
            await self._produce_all(producer, reports)
            if not reports.seal():
                done, _ = await asyncio.wait(
                    [reports.future], timeout=self.message_timeout + DELIVERY_GRACE
                )
                if not done:
                    producer.broken = (
                        f"delivery reports were missing {self.message_timeout + DELIVERY_GRACE:g} "
                        "s after producing"
                    )
        finally:
            producer.pending.discard(reports)
        results = reports.close(
            PublishResult(
                Outcome.UNAVAILABLE,
                f"no delivery report from Kafka at {self.bootstrap_servers} within "
                f"{self.message_timeout + DELIVERY_GRACE:g} s",
            )
        )
        if producer.broken is None and any(r.outcome is Outcome.UNAVAILABLE for r in results):
            # A producer can stay wedged after an outage: e.g. a broker that lost its
            # producer-id state answers UNKNOWN_PRODUCER_ID to every epoch bump, so all
            # later messages time out. A fresh producer gets a fresh id.
            producer.broken = "some messages were not delivered"
        return results

    async def close(self) -> None:
        """Wait (up to ``message.timeout.ms``) for deliveries in flight, then stop the producer."""
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.shutdown(flush_timeout=self.message_timeout)

    async def _ensure_producer(self) -> _Producer:
        current = self._producer
        loop = asyncio.get_running_loop()
        if current is not None and current.loop is not loop:
            # Its poll thread hands results to the event loop it was created on.
            current.broken = current.broken or "the publisher moved to another event loop"
        if current is not None and current.broken is None:
            return current
        if current is not None:
            _log.warning("replacing the Kafka producer", reason=current.broken)
            self._producer = None
            await current.shutdown(flush_timeout=0)
        try:
            self._producer = _Producer(self._settings, loop)
        except KafkaException as exc:
            raise ConfigurationError(
                f"the Kafka producer rejected its configuration: {_describe(exc.args[0])}"
            ) from None
        return self._producer

    async def _check_cluster(self, producer: _Producer) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            remaining = deadline - loop.time()
            call = functools.partial(
                producer.producer.list_topics,
                timeout=max(0.01, min(remaining, _METADATA_SLICE_SECONDS)),
            )
            try:
                metadata = await loop.run_in_executor(None, call)
            except KafkaException as exc:
                reason = _describe(exc.args[0])
            else:
                if metadata.brokers:
                    producer.all_brokers_down = None
                    return
                reason = "the cluster named no brokers"
            # Only a failed request makes "all brokers are down" count: the flag may be
            # left over from an earlier outage of a producer that is being reused.
            if producer.all_brokers_down is not None:
                reason = producer.all_brokers_down
                break
            if loop.time() >= deadline:
                reason = f"no answer within {self.connect_timeout:g} s ({reason})"
                break
            await asyncio.sleep(0.05)
        raise BrokerUnavailableError(
            f"cannot reach Kafka at {self.bootstrap_servers}: {reason}; check that the "
            "brokers run and that the broker URL (POSTROOM_BROKER_URL) is right"
        )

    async def _produce_all(self, producer: _Producer, reports: _Reports) -> None:
        """Hand every message of ``reports`` to librdkafka, in order.

        A message refused at once (too large, invalid) gets its result here; the others get
        theirs from their delivery reports. A full producer queue waits for room, up to
        ``message.timeout.ms``, then the rest of the batch is UNAVAILABLE.
        """
        loop = asyncio.get_running_loop()
        queue_deadline = loop.time() + self.message_timeout
        index = 0
        count = len(reports.messages)
        while index < count:
            index = producer.produce_from(reports, index)
            if index >= count:
                return
            # produce_from stopped on a full queue: wait for delivery reports to make room.
            if producer.broken is not None:
                reports.fail_from(index, _unavailable_after_failure(producer.broken))
                return
            if loop.time() >= queue_deadline:
                reports.fail_from(
                    index,
                    PublishResult(
                        Outcome.UNAVAILABLE,
                        f"the producer queue stayed full for {self.message_timeout:g} s; "
                        f"Kafka at {self.bootstrap_servers} is not taking messages",
                    ),
                )
                return
            producer.progress.clear()
            producer.waiting_for_room = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(producer.progress.wait(), 1.0)


def classify_error(error: KafkaError, message: Message) -> PublishResult:
    """The result for a message whose produce() call or delivery report carried ``error``."""
    code = error.code()
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return PublishResult(
            Outcome.REJECTED,
            f"message is too large for Kafka (body {len(message.body)} bytes, over the "
            "producer's message.max.bytes or the topic's max.message.bytes): "
            f"{_describe(error)}; send a reference to the data instead",
        )
    unavailable = code in _UNAVAILABLE_CODES or (
        code not in _REJECTED_CODES and (error.fatal() or error.retriable())
    )
    if unavailable:
        return PublishResult(
            Outcome.UNAVAILABLE, f"Kafka did not take the message: {_describe(error)}"
        )
    if code in {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC}:
        return PublishResult(
            Outcome.REJECTED,
            f"topic {message.topic!r} does not exist and the cluster does not create topics "
            f"on first use ({_describe(error)}); create the topic",
        )
    return PublishResult(Outcome.REJECTED, f"Kafka refused the message: {_describe(error)}")


def _unavailable_after_failure(reason: str) -> PublishResult:
    return PublishResult(
        Outcome.UNAVAILABLE,
        f"the Kafka producer failed ({reason}); a new producer is started for the next publish",
    )


def _describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


class _LibrdkafkaLog:
    """Receives librdkafka's log lines (served by the poll thread) and sends them to structlog."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # librdkafka logs every failed reconnect as an error; outages are reported per
        # message and by error_cb, so its lines are capped at warning.
        _log.log(min(level, logging.WARNING), "librdkafka", detail=fmt % args if args else fmt)


class _Reports:
    """The delivery reports of one publish() call, counted as they arrive.

    The poll thread writes each message's result into ``results`` (CONFIRMED only from a
    report without error) and wakes the event loop once, when the last expected report is
    in. The event loop thread only produces, seals and reads. ``_lock`` orders the two.
    """

    __slots__ = (
        "_closed",
        "_expected",
        "_lock",
        "_reported",
        "_sealed",
        "future",
        "messages",
        "producer",
        "results",
    )

    def __init__(self, producer: _Producer, messages: Sequence[Message]) -> None:
        self.producer = producer
        self.messages = messages
        self.results: list[PublishResult | None] = [None] * len(messages)
        self.future: asyncio.Future[None] = producer.loop.create_future()
        self._lock = threading.Lock()
        self._expected = 0
        """Messages handed to librdkafka (each will get one delivery report)."""
        self._reported = 0
        self._sealed = False
        """True once every message was produced or got its result: no more are expected."""
        self._closed = False
        """True once publish() read the results: later reports are ignored."""

    def expect(self, produced: int) -> None:
        """``produced`` more messages were handed to librdkafka (event loop thread)."""
        with self._lock:
            self._expected += produced

    def refused(self, index: int, result: PublishResult) -> None:
        """Message ``index`` was not produced; ``result`` says why (event loop thread)."""
        self.results[index] = result

    def fail_from(self, index: int, result: PublishResult) -> None:
        """Messages from ``index`` on were not produced (event loop thread)."""
        for position in range(index, len(self.messages)):
            self.results[position] = result

    def seal(self) -> bool:
        """No more messages will be produced; True if every report is already in."""
        with self._lock:
            self._sealed = True
            complete = self._reported >= self._expected
        if complete and not self.future.done():
            self.future.set_result(None)
        return complete

    def report(self, index: int, error: KafkaError | None, _record: Any) -> None:
        """librdkafka's delivery report for message ``index`` (poll thread)."""
        result = CONFIRMED if error is None else classify_error(error, self.messages[index])
        with self._lock:
            if self._closed:
                return
            self.results[index] = result
            self._reported += 1
            last = self._sealed and self._reported == self._expected
        if last:
            self.producer.to_loop(self._wake)
        elif self.producer.waiting_for_room:
            self.producer.waiting_for_room = False
            self.producer.to_loop(self.producer.progress.set)

    def _wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
        self.producer.progress.set()

    def fail(self, result: PublishResult) -> None:
        """The producer failed or closed: stop waiting (event loop thread)."""
        with self._lock:
            self.results = [r if r is not None else result for r in self.results]
        self._wake()

    def close(self, missing: PublishResult) -> list[PublishResult]:
        """The final results, ``missing`` for messages without a report (event loop thread)."""
        with self._lock:
            self._closed = True
            return [r if r is not None else missing for r in self.results]


class _Producer:
    """One librdkafka producer, the thread that polls it, and the batches awaiting reports.

    Attributes other than ``producer`` are read and written on the event loop's thread;
    the poll thread only hands results over through :class:`_Reports` (under its lock)
    and ``call_soon_threadsafe``.
    """

    def __init__(self, settings: Mapping[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.broken: str | None = None
        self.all_brokers_down: str | None = None
        self.progress = asyncio.Event()
        self.waiting_for_room = False
        """Set when a publish waits for queue room: the next report wakes it."""
        self.pending: set[_Reports] = set()
        self._stop = threading.Event()
        self.producer: Any = confluent_kafka.Producer(
            {**settings, "error_cb": self._on_error, "logger": _LibrdkafkaLog()}
        )
        self._thread = threading.Thread(
            target=self._poll_forever, name="postroom-kafka-poll", daemon=True
        )
        self._thread.start()

    def produce_from(self, reports: _Reports, start: int) -> int:
        """Hand messages ``start``, ``start + 1``, ... of ``reports`` to librdkafka.

        Returns the index of the first message not handed over because the queue is full
        (or the batch's length when all were). A message librdkafka refuses at once gets
        its result in ``reports``; after a fatal error the rest are UNAVAILABLE.
        """
        produce = self.producer.produce
        report = reports.report
        messages = reports.messages
        index = start
        produced = 0
        try:
            for index in range(start, len(messages)):
                message = messages[index]
                try:
                    produce(
                        message.topic,
                        value=message.body,
                        key=message.key,
                        headers=list(message.wire_headers().items()),
                        timestamp=int(message.created_at.timestamp() * 1000),
                        on_delivery=functools.partial(report, index),
                    )
                except BufferError:
                    return index
                except KafkaException as exc:
                    error: KafkaError = exc.args[0]
                    if error.fatal() or error.code() == KafkaError._FATAL:
                        self.broken = _describe(error)
                        reports.fail_from(index, _unavailable_after_failure(self.broken))
                        return len(messages)
                    reports.refused(index, classify_error(error, message))
                    continue
                except (TypeError, ValueError) as exc:
                    reports.refused(
                        index,
                        PublishResult(
                            Outcome.REJECTED, f"the Kafka client refused the message: {exc}"
                        ),
                    )
                    continue
                produced += 1
            return len(messages)
        finally:
            reports.expect(produced)

    async def shutdown(self, *, flush_timeout: float) -> None:
        """Deliver what is in flight (up to ``flush_timeout``), then stop and free the producer."""
        self.broken = self.broken or "the producer was closed"
        await self.loop.run_in_executor(None, self._shutdown_blocking, flush_timeout)
        self._fail_pending("the Kafka producer was closed before Kafka confirmed the message")

    def _shutdown_blocking(self, flush_timeout: float) -> None:
        self._stop.set()
        self._thread.join()
        producer, self.producer = self.producer, None
        if producer is None:
            return
        try:
            if flush_timeout > 0 and producer.flush(flush_timeout) == 0:
                return
            producer.purge()
            producer.flush(0)
        except KafkaException as exc:
            _log.warning("stopping the Kafka producer", error=_describe(exc.args[0]))

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(_POLL_SECONDS)
            except KafkaException as exc:
                self._on_error(exc.args[0])
            except Exception:
                _log.exception("Kafka poll failed")

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            _log.error("Kafka producer failed fatally", error=_describe(error))
            self.to_loop(self._mark_broken, _describe(error))
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.to_loop(setattr, self, "all_brokers_down", _describe(error))
            _log.warning("all Kafka brokers are down", error=_describe(error))

    def _mark_broken(self, reason: str) -> None:
        self.broken = self.broken or reason
        self._fail_pending(f"the Kafka producer failed ({reason}); it is replaced")

    def _fail_pending(self, reason: str) -> None:
        failed = PublishResult(Outcome.UNAVAILABLE, reason)
        for reports in list(self.pending):
            reports.fail(failed)
        self.progress.set()

    def to_loop(self, callback: Any, *args: Any) -> None:
        """Run ``callback(*args)`` on the event loop thread (from any thread)."""
        # A closed event loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)


# ----------------------------------------------------------------------------- subscriber

#: librdkafka settings that only consumers understand (kept out of the dead-letter producer).
_CONSUMER_ONLY_SETTINGS: Final = frozenset(
    {
        "group.id",
        "group.instance.id",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "auto.offset.reset",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "isolation.level",
        "partition.assignment.strategy",
        "group.protocol",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.wait.max.ms",
        "max.partition.fetch.bytes",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "enable.partition.eof",
        "check.crcs",
    }
)
#: Settings the subscriber sets itself: commits happen only after the handler's commit.
_SUBSCRIBER_OWNED: Final = frozenset(
    {"group.id", "enable.auto.commit", "enable.auto.offset.store", "on_commit"}
)

Partition = tuple[str, int]


class KafkaDelivery:
    """One record of a partition; its ack commits the offset after it (in partition order)."""

    redeliverable = False

    def __init__(self, subscriber: KafkaSubscriber, record: Any, epoch: int) -> None:
        from postroom.brokers.base import attempts_made

        self._subscriber = subscriber
        self.partition: int = record.partition()
        self.offset: int = record.offset()
        self.topic: str = record.topic()
        self.lane: object = (self.topic, self.partition)
        self.epoch = epoch
        raw_key = record.key()
        self.key: str | None = (
            raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else raw_key
        )
        self.body: bytes = record.value() or b""
        self.headers: dict[str, str] = {
            name: (value.decode(errors="replace") if isinstance(value, bytes) else str(value))
            for name, value in (record.headers() or [])
            if value is not None
        }
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
    ) -> None:
        settings = dict(config or {})
        owned = sorted(_SUBSCRIBER_OWNED & settings.keys())
        if owned:
            raise ConfigurationError(
                f"the Kafka subscriber sets {', '.join(owned)} itself; remove them "
                "(the group id is the consumer's name)"
            )
        self.bootstrap_servers = bootstrap_servers
        self.prefetch = max(1, prefetch)
        self.connect_timeout = connect_timeout
        self.idle_poll_interval = idle_poll_interval
        self._settings = settings
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
            **self._settings,
            "group.id": consumer,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "logger": _LibrdkafkaLog(),
        }
        try:
            kafka_consumer = confluent_kafka.Consumer(config)
        except KafkaException as exc:
            raise ConfigurationError(
                f"the Kafka consumer rejected its configuration: {_describe(exc.args[0])}"
            ) from None
        try:
            await asyncio.to_thread(kafka_consumer.list_topics, timeout=self.connect_timeout)
        except KafkaException as exc:
            await asyncio.to_thread(kafka_consumer.close)
            raise BrokerUnavailableError(
                f"cannot reach Kafka at {self.bootstrap_servers}: {_describe(exc.args[0])}; "
                "check that the brokers run and the broker URL (POSTROOM_BROKER_URL) is right"
            ) from None
        producer_config = {
            k: v for k, v in self._settings.items() if k not in _CONSUMER_ONLY_SETTINGS
        }
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
                delivery = await asyncio.wait_for(self._queue.get(), 0.5)
            except TimeoutError:
                continue
            if self._owns(delivery):
                yield delivery

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

    async def _poll_forever(self) -> None:
        while True:
            consumer = self._consumer
            if consumer is None:
                return
            try:
                records = consumer.consume(num_messages=500, timeout=0)
            except (KafkaException, RuntimeError) as exc:
                _log.warning("Kafka consume failed", error=str(exc))
                records = []
            for record in records:
                error = record.error()
                if error is None:
                    self._accept(record)
                elif error.code() != KafkaError._PARTITION_EOF:
                    _log.warning("Kafka consumer error", error=_describe(error))
            await asyncio.sleep(0 if records else self.idle_poll_interval)

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.add(key)
            self._epochs[key] = self._epochs.get(key, 0) + 1
            self._reset(key)
        _log.info("partitions assigned", group=self.group, partitions=_names(partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.discard(key)
            self._epochs[key] = self._epochs.get(key, 0) + 1
            self._reset(key)
        _log.info("partitions revoked", group=self.group, partitions=_names(partitions))

    def _reset(self, key: Partition) -> None:
        self._outstanding.pop(key, None)
        self._paused.pop(key, None)
        self._next_offset.pop(key, None)

    def _accept(self, record: Any) -> None:
        key = (record.topic(), record.partition())
        offset = record.offset()
        if key not in self._assigned or key in self._paused:
            return
        if offset < self._next_offset.get(key, -1):
            return  # fetched again after a pause; already handed out
        if self._outstanding.get(key, 0) >= self.prefetch:
            self._pause(key, offset)
            return
        self._next_offset[key] = offset + 1
        self._outstanding[key] = self._outstanding.get(key, 0) + 1
        self._queue.put_nowait(KafkaDelivery(self, record, self._epochs.get(key, 0)))

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
            consumer.commit(offsets=[tp], asynchronous=True)
        except KafkaException as exc:
            raise BrokerUnavailableError(
                f"Kafka did not take the offset commit: {_describe(exc.args[0])}"
            ) from None

    async def _dead_letter(self, delivery: KafkaDelivery, error: str, attempts: int) -> None:
        import uuid as _uuid

        from postroom._uuid7 import uuid7
        from postroom.brokers.base import HEADER_OFFSET, HEADER_PARTITION, dead_letter_headers
        from postroom.message import ENVELOPE_HEADERS, HEADER_CONTENT_TYPE, HEADER_ID, OCTET_STREAM

        headers = dead_letter_headers(delivery, self.group, error, attempts)
        headers[HEADER_PARTITION] = str(delivery.partition)
        headers[HEADER_OFFSET] = str(delivery.offset)
        try:
            message_id = _uuid.UUID(headers.get(HEADER_ID, ""))
        except ValueError:
            message_id = uuid7()
        content_type = headers.pop(HEADER_CONTENT_TYPE, None) or OCTET_STREAM
        for name in ENVELOPE_HEADERS:
            headers.pop(name, None)
        now = datetime.now(UTC)
        copy = Message(
            id=message_id,
            topic=self._dead_letter_topic,
            body=delivery.body,
            content_type=content_type,
            created_at=now,
            available_at=now,
            key=delivery.key,
            headers=headers,
        )
        assert self._publisher is not None
        (result,) = await self._publisher.publish([copy])
        if not result.confirmed:
            raise BrokerUnavailableError(
                f"the dead-letter copy was not confirmed by Kafka: {result.error}"
            )


def _names(partitions: list[Any]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
