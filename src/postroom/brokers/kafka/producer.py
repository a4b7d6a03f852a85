"""Kafka publisher: an idempotent confluent-kafka producer with ``acks=all``, bridged to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from postroom.brokers.base import CONFIRMED, Outcome, PublishResult, too_large, wire_size
from postroom.brokers.kafka.settings import (
    _METADATA_SLICE_SECONDS,
    _OWNED_SETTINGS,
    _POLL_SECONDS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MESSAGE_TIMEOUT_MS,
    DELIVERY_GRACE,
    REFUSED_CODES,
    _describe,
    _LibrdkafkaLog,
    _log,
    _unavailable_after_failure,
    classify_error,
    parse_kafka_url,
    untrusted_certificate,
)
from postroom.brokers.kafka.topics import TopicCreator
from postroom.cloudevents import CloudEvents
from postroom.errors import BrokerRefusedError, BrokerUnavailableError, ConfigurationError
from postroom.message import Message

#: librdkafka's default ``message.max.bytes``.
KAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
#: Bytes counted on top of a record's key, value and headers: the record batch header
#: (61) and the record's own varint fields, rounded up so the check stays conservative.
RECORD_OVERHEAD_BYTES = 128


class KafkaPublisher:
    """Publishes with an idempotent producer (``enable.idempotence``, ``acks=all``).

    Record key = the message key (UTF-8, none without a key), topic = the message topic,
    value = the body, headers = the postroom and user headers, timestamp = ``created_at``.
    Delivery reports are served by a poll thread and resolve asyncio futures. A message
    that is not delivered within ``message.timeout.ms`` is UNAVAILABLE; a producer that
    failed fatally is replaced on the next publish. The default partitioner is
    ``murmur2_random``, which places keys on the same partitions as the Java client.
    With ``create_topics``, a topic not met before is created (the cluster's default
    partitions and replication factor) before the first message to it is produced.
    With ``cloudevents``, messages of the topics it covers also carry the CloudEvents
    binary-mode headers (``ce_id``, ``ce_source``, ..., ``content-type``).
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        message_timeout_ms: int = DEFAULT_MESSAGE_TIMEOUT_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        config: Mapping[str, Any] | None = None,
        create_topics: bool = False,
        cloudevents: CloudEvents | None = None,
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
        try:
            max_bytes = int(settings.get("message.max.bytes", KAFKA_DEFAULT_MESSAGE_MAX_BYTES))
        except (TypeError, ValueError):
            max_bytes = 0
        if max_bytes <= 0:
            raise ConfigurationError(
                "message.max.bytes must be a positive number of bytes, got "
                f"{settings.get('message.max.bytes')!r}"
            )
        self.bootstrap_servers = servers
        """The brokers first contacted, ``host:port[,host:port]``."""
        self.max_message_bytes = max_bytes
        """The producer's ``message.max.bytes``: larger records (with key, headers and
        record overhead) are REJECTED unsent, permanently."""
        self.message_timeout = timeout_ms / 1000
        """Seconds after which an undelivered message is reported UNAVAILABLE."""
        self.connect_timeout = connect_timeout
        """Seconds connect() waits for the cluster to answer."""
        self._settings = settings
        self.cloudevents = cloudevents
        """Which topics carry the CloudEvents headers (None: none)."""
        self._topics: TopicCreator | None = None
        if create_topics:
            self._topics = TopicCreator(servers, {**settings, "client.id": "postroom-admin"})
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
        if self._topics is not None:
            await self._topics.ensure(message.topic for message in batch)
        async with self._lock:
            producer = await self._ensure_producer()
        reports = _Reports(producer, batch, self.cloudevents)
        limit = self.max_message_bytes
        for index, message in enumerate(batch):
            size = wire_size(message, reports.extra_headers[index]) + RECORD_OVERHEAD_BYTES
            if size > limit:
                reports.refused(index, too_large(size, limit, "the producer's message.max.bytes"))
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
        if producer.refused is not None:
            producer.broken = producer.broken or f"refused by Kafka: {producer.refused}"
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
            self._raise_if_refused(producer)
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
        self._raise_if_refused(producer)
        # Only when no broker answered: one broker's certificate (expired, mid-rotation)
        # while others serve is an outage of that broker, not a refusal of this client.
        self._raise_if_untrusted(producer)
        raise BrokerUnavailableError(
            f"cannot reach Kafka at {self.bootstrap_servers}: {reason}; check that the "
            "brokers run and that the broker URL (POSTROOM_BROKER_URL) is right"
        )

    def _raise_if_untrusted(self, producer: _Producer) -> None:
        if producer.untrusted is not None:
            raise BrokerRefusedError(
                f"Kafka at {self.bootstrap_servers} presented a TLS certificate this client "
                f"does not trust ({producer.untrusted}); set POSTROOM_KAFKA_SSL_CA_LOCATION "
                "(ssl.ca.location) to the CA that signed the broker's certificate"
            )

    def _raise_if_refused(self, producer: _Producer) -> None:
        if producer.refused is not None:
            raise BrokerRefusedError(
                f"Kafka at {self.bootstrap_servers} refused this client ({producer.refused}); "
                "fix the SASL/SSL settings (sasl.username, sasl.password, security.protocol, "
                "e.g. in POSTROOM_KAFKA_* or POSTROOM_KAFKA_CONFIG_FILE) or the client's ACLs"
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
                async with asyncio.timeout(1.0):
                    await producer.progress.wait()


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
        "extra_headers",
        "future",
        "messages",
        "producer",
        "results",
    )

    def __init__(
        self,
        producer: _Producer,
        messages: Sequence[Message],
        cloudevents: CloudEvents | None = None,
    ) -> None:
        self.producer = producer
        self.messages = messages
        self.extra_headers: list[dict[str, str]] = [
            cloudevents.kafka_headers(message) if cloudevents is not None else {}
            for message in messages
        ]
        """The headers each message carries beside its own: its CloudEvents attributes."""
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

    def headers(self, index: int) -> list[tuple[str, str]]:
        """Every header of message ``index`` on the wire: postroom's, the user's, CloudEvents'."""
        headers = self.messages[index].wire_headers()
        headers.update(self.extra_headers[index])
        return list(headers.items())

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
        self.refused: str | None = None
        """Set when the cluster refused this client (authentication, authorization)."""
        self.untrusted: str | None = None
        """Set when a broker's TLS certificate failed verification (a refusal only if no
        broker answered)."""
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
            refused = reports.results
            for index in range(start, len(messages)):
                if refused[index] is not None:
                    continue  # already answered: too large to send
                message = messages[index]
                try:
                    produce(
                        message.topic,
                        value=message.body,
                        key=message.key,
                        headers=reports.headers(index),
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
        if error.code() in REFUSED_CODES:
            self.to_loop(setattr, self, "refused", _describe(error))
            return
        if untrusted_certificate(error):
            self.to_loop(setattr, self, "untrusted", _describe(error))
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
