"""Read back what reached the broker with its own client, as a user's consumer would.

RabbitMQ (aio-pika): :class:`RabbitMQReadback` declares the durable topic exchange
``postroom`` (as the relay does), an exclusive auto-delete queue, and binds it with the
test's pattern. Start it BEFORE anything is published: the relay publishes with
``mandatory``, so a message with no bound queue is returned, not stored.

Kafka (confluent-kafka): :class:`KafkaReadback` creates the test's topics if they do not
exist, then a background thread consumes every partition of them with ``assign()`` from
``OFFSET_BEGINNING`` (no consumer group join, which is slow on Tansu). Count by consuming:
Tansu's end offsets under-report.

Both collect :class:`Delivered` records in arrival order and offer the same waits;
:func:`check_deliveries` compares them with the messages that were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from postroom.brokers.base import dead_letter_name
from postroom.message import (
    HEADER_CONTENT_TYPE,
    HEADER_CREATED_AT,
    HEADER_ID,
    HEADER_KEY,
    Message,
)
from tests.support.services import QuietLog
from tests.support.waiting import Options, wait_until, wait_until_sync

EXCHANGE = "postroom"


@dataclass(frozen=True)
class Delivered:
    """One message as the broker's own client received it."""

    id: str
    """AMQP ``message_id`` property; Kafka: the ``postroom-id`` header."""
    topic: str
    """AMQP routing key; Kafka topic."""
    key: str | None
    """Kafka record key; AMQP: the ``postroom-key`` header."""
    body: bytes
    content_type: str
    """AMQP ``content_type`` property; Kafka: the ``postroom-content-type`` header."""
    headers: dict[str, str]
    arrived: float
    """``time.monotonic()`` when the read-back received it."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Broker specifics: AMQP ``delivery_mode`` and ``exchange``; Kafka ``partition``, ``offset``
    and ``timestamp``."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def amqp_delivered(message: Any, **extra: Any) -> Delivered:
    """An aio-pika message as a :class:`Delivered` (``extra`` adds broker specifics)."""
    headers = {name: _text(value) for name, value in (message.headers or {}).items()}
    return Delivered(
        id=_text(message.message_id) if message.message_id is not None else "",
        topic=_text(message.routing_key),
        key=headers.get(HEADER_KEY),
        body=bytes(message.body),
        content_type=_text(message.content_type or ""),
        headers=headers,
        arrived=time.monotonic(),
        extra={
            "delivery_mode": int(message.delivery_mode or 0),
            "exchange": message.exchange,
            **extra,
        },
    )


class _Collector:
    """Thread-safe list of deliveries with waits (sync and async)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[Delivered] = []
        self._error: BaseException | None = None

    def _add(self, delivered: Delivered) -> None:
        with self._lock:
            self._received.append(delivered)

    @property
    def received(self) -> list[Delivered]:
        """Everything received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._received)

    @property
    def count(self) -> int:
        """How many deliveries so far (duplicates included)."""
        with self._lock:
            return len(self._received)

    def ids(self) -> set[str]:
        """Distinct message ids received so far."""
        with self._lock:
            return {d.id for d in self._received}

    def failure(self) -> BaseException | None:
        """What stopped the reading, if it stopped."""
        return self._error

    def _check(self) -> None:
        if self._error is not None:
            raise AssertionError(f"the read-back consumer failed: {self._error!r}")

    def _describe(self) -> str:
        return type(self).__name__

    def _options(self, within: float, what: str, detail: Callable[[], str]) -> Options:
        what = f"{self._describe()}: {what}"
        return {
            "within": within,
            "interval": 0.02,
            "what": what,
            "watch": self._check,
            "detail": detail,
        }

    def _all_of(self, ids: Iterable[str], within: float) -> tuple[Callable[[], bool], Options]:
        """The check that every id of ``ids`` arrived, and how to wait for it."""
        wanted = {str(i) for i in ids}

        def detail() -> str:
            missing = sorted(wanted - self.ids())
            return f"{len(missing)} of {len(wanted)} messages missing (e.g. {missing[:3]})"

        return (lambda: wanted <= self.ids()), self._options(within, "every id", detail)

    async def wait_for(self, count: int, within: float) -> list[Delivered]:
        """Wait until ``count`` deliveries arrived; return them all. Fails on timeout."""
        options = self._options(
            within, f"{count} messages", lambda: f"{self.count} of {count} arrived"
        )
        await wait_until(lambda: self.count >= count, **options)
        return self.received

    async def wait_for_ids(self, ids: Iterable[str], within: float) -> list[Delivered]:
        """Wait until every id in ``ids`` arrived at least once. Fails on timeout."""
        arrived, options = self._all_of(ids, within)
        await wait_until(arrived, **options)
        return self.received

    def wait_for_ids_sync(self, ids: Iterable[str], within: float) -> list[Delivered]:
        """:meth:`wait_for_ids` for sync tests (the consumer must run on another thread)."""
        arrived, options = self._all_of(ids, within)
        wait_until_sync(arrived, **options)
        return self.received


# ----------------------------------------------------------------------------- RabbitMQ


class RabbitMQReadback(_Collector):
    """An exclusive queue bound to the ``postroom`` exchange, consumed as messages arrive.

    Use as ``async with RabbitMQReadback(url, "t.abc.#") as readback:``. The queue exists
    from :meth:`start` until :meth:`close` (or the connection drops: it is exclusive and
    auto-delete, so nothing is left behind on the broker).
    """

    def __init__(self, url: str, binding: str, *, exchange: str = EXCHANGE) -> None:
        super().__init__()
        self.url = url
        self.binding = binding
        self.exchange = exchange
        self.queue_name: str | None = None
        self._connection: Any = None

    def _describe(self) -> str:
        return f"RabbitMQ read-back of {self.binding!r}"

    async def start(self) -> RabbitMQReadback:
        """Connect, declare the exchange and the bound queue, and start consuming."""
        import aio_pika

        self._connection = await aio_pika.connect(
            self.url, client_properties={"connection_name": "postroom test read-back"}
        )
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            f"readback-{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange, routing_key=self.binding)
        self.queue_name = queue.name
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: Any) -> None:
        self._add(amqp_delivered(message))

    async def close(self) -> None:
        """Close the connection (the exclusive queue goes with it)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 10)

    async def __aenter__(self) -> RabbitMQReadback:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def delete_consumer_queues(amqp_url: str, consumer: str) -> None:
    """Remove a consumer's queue, dead-letter queue and retry queues from RabbitMQ."""
    import aio_pika

    names = [consumer, dead_letter_name(consumer)]
    names += [f"{consumer}.retry.{2**power}ms" for power in range(4, 20)]
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def drain_queue(amqp_url: str, queue: str) -> list[Delivered]:
    """Take (and acknowledge) every message now in the existing ``queue``, in order."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    taken: list[Delivered] = []
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, passive=True)
        while (message := await declared.get(fail=False)) is not None:
            await message.ack()
            taken.append(amqp_delivered(message))
    finally:
        await connection.close()
    return taken


# ----------------------------------------------------------------------------- Kafka


def create_topics(bootstrap: str, topics: Sequence[str], *, partitions: int = 4) -> None:
    """Create ``topics`` with ``partitions`` each; topics that already exist are fine."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": QuietLog()}
    admin = AdminClient(config)
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics],
        operation_timeout=10,
        request_timeout=15,
    )
    for topic, future in futures.items():
        try:
            future.result(15)
        except Exception as exc:
            code = getattr(exc.args[0], "code", None) if exc.args else None
            if code is None or code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise AssertionError(f"cannot create Kafka topic {topic}: {exc}") from exc


class _OffsetFollower:
    """Hands out a partition's records in offset order without skipping any: a fetch that
    jumps past offsets not seen yet is fetched again from the first missing one, once (the
    local Kafka-compatible broker can answer a fetch with a later batch while an earlier one
    is still being written); a jump still there on the second fetch is a real hole."""

    def __init__(
        self, consumer: Any, topic_partition: Any, partitions: Iterable[tuple[str, int]] = ()
    ) -> None:
        self._consumer = consumer
        self._topic_partition = topic_partition
        self._next: dict[tuple[str, int], int] = dict.fromkeys(partitions, 0)
        self._retried: dict[tuple[str, int], int] = {}

    def in_order(self, records: Sequence[Any]) -> list[Any]:
        """The records of one fetch that come next, each once."""
        taken: list[Any] = []
        refetching: set[tuple[str, int]] = set()
        for record in records:
            if record.error() is not None:
                continue
            key = (record.topic(), record.partition())
            offset = record.offset()
            expected = self._next.get(key)
            if key in refetching or (expected is not None and offset < expected):
                continue
            if expected is not None and offset > expected and self._retried.get(key) != expected:
                self._retried[key] = expected
                try:
                    self._consumer.seek(self._topic_partition(key[0], key[1], expected))
                except Exception:
                    # The partition cannot be sought now (it is being fetched afresh): take
                    # the jump; read_kafka_to_end settles whether the offsets were there.
                    pass
                else:
                    refetching.add(key)
                    continue
            self._next[key] = offset + 1
            taken.append(record)
        return taken


class KafkaReadback(_Collector):
    """Every partition of ``topics``, consumed from the beginning on a background thread.

    Use as ``with KafkaReadback(bootstrap, [topic]) as readback:`` (sync or async tests);
    waits are :meth:`wait_for` / :meth:`wait_for_ids` (async) and
    :meth:`wait_for_ids_sync`. The thread stops on :meth:`close`, or by itself after
    ``lifetime`` seconds.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        *,
        partitions: int = 4,
        create: bool = True,
        lifetime: float = 600.0,
    ) -> None:
        super().__init__()
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.partitions = partitions
        self.create = create
        self.lifetime = lifetime
        self.assigned: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def _describe(self) -> str:
        return f"Kafka read-back of {', '.join(self.topics)}"

    def start(self, timeout: float = 20.0) -> KafkaReadback:
        """Create the topics (unless ``create=False``), assign all partitions, start reading."""
        if self.create:
            create_topics(self.bootstrap, self.topics, partitions=self.partitions)
        self._thread = threading.Thread(target=self._run, name="kafka-readback", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise AssertionError(f"{self._describe()}: no partitions assigned within {timeout} s")
        self._check()
        return self

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = None
        try:
            consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": f"readback-{uuid.uuid4().hex[:12]}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": False,
                    # A fetch the broker answers "out of range" (a seek into a hole of the
                    # offsets) starts the partition again from its first record, whose
                    # records already taken are skipped; "latest" would skip the rest.
                    "auto.offset.reset": "earliest",
                    "fetch.wait.max.ms": 100,
                    "topic.metadata.refresh.interval.ms": 1000,
                    "reconnect.backoff.max.ms": 500,
                    "logger": QuietLog(),
                }
            )
            assignment = self._partitions(consumer)
            consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in assignment])
            self.assigned = assignment
            self._ready.set()
            deadline = time.monotonic() + self.lifetime
            following = _OffsetFollower(consumer, TopicPartition, assignment)
            while not self._stop.is_set() and time.monotonic() < deadline:
                records = consumer.consume(num_messages=1000, timeout=0.1)
                for record in following.in_order(records):
                    self._add(self._delivered(record))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    consumer.close()

    def _partitions(self, consumer: Any) -> list[tuple[str, int]]:
        deadline = time.monotonic() + 15
        found: list[tuple[str, int]] = []
        for topic in self.topics:
            while True:
                metadata = consumer.list_topics(topic, timeout=5)
                described = metadata.topics.get(topic)
                if described is not None and described.error is None and described.partitions:
                    found += [(topic, p) for p in sorted(described.partitions)]
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"Kafka topic {topic} has no partitions")
                time.sleep(0.2)
        return found

    @staticmethod
    def _delivered(record: Any) -> Delivered:
        headers = {name: _text(value) for name, value in record.headers() or []}
        key = record.key()
        return Delivered(
            id=headers.get(HEADER_ID, ""),
            topic=record.topic(),
            key=key.decode() if key is not None else None,
            body=record.value() or b"",
            content_type=headers.get(HEADER_CONTENT_TYPE, ""),
            headers=headers,
            arrived=time.monotonic(),
            extra={
                "partition": record.partition(),
                "offset": record.offset(),
                "timestamp": record.timestamp(),
            },
        )

    def close(self) -> None:
        """Stop the consumer thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def __enter__(self) -> KafkaReadback:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- checking


@dataclass
class DeliveryReport:
    """How the deliveries compare with what was written."""

    written: int
    deliveries: int
    distinct: int
    missing: list[str]
    unexpected: list[str]
    duplicates: int
    """Deliveries of an id already delivered (exact copies; allowed, at-least-once)."""
    mismatches: list[str]
    """Deliveries whose content differs from what was written (never allowed)."""
    order_violations: list[str]
    """Keys whose first deliveries do not follow the write order (never allowed)."""

    def summary(self) -> str:
        """One line for the test log."""
        return (
            f"written {self.written}, delivered {self.deliveries} ({self.distinct} distinct, "
            f"{self.duplicates} duplicates), missing {len(self.missing)}, unexpected "
            f"{len(self.unexpected)}, mismatched {len(self.mismatches)}, order violations "
            f"{len(self.order_violations)}"
        )

    def assert_exact(self) -> None:
        """Every written message arrived, as written, each key in order; nothing else."""
        problems = []
        if self.missing:
            problems.append(f"missing ids (first 5): {self.missing[:5]}")
        if self.unexpected:
            problems.append(f"unexpected ids (first 5): {self.unexpected[:5]}")
        if self.mismatches:
            problems.append("content differs (first 5):\n  " + "\n  ".join(self.mismatches[:5]))
        if self.order_violations:
            problems.append(
                "per-key order broken (first 5):\n  " + "\n  ".join(self.order_violations[:5])
            )
        assert not problems, self.summary() + "\n" + "\n".join(problems)


def _differences(message: Message, delivered: Delivered, kafka: bool) -> list[str]:
    wire = message.wire_headers()
    found: list[str] = []
    if delivered.body != message.body:
        found.append(f"body {delivered.body[:60]!r} != {message.body[:60]!r}")
    if delivered.content_type != message.content_type:
        found.append(f"content type {delivered.content_type!r} != {message.content_type!r}")
    if delivered.key != message.key:
        found.append(f"key {delivered.key!r} != {message.key!r}")
    if delivered.topic != message.topic:
        found.append(f"topic {delivered.topic!r} != {message.topic!r}")
    headers = dict(delivered.headers)
    created = headers.pop(HEADER_CREATED_AT, None)
    expected_created = wire.pop(HEADER_CREATED_AT)
    # Same instant is what matters; the UTC offset's spelling follows the server's TimeZone.
    if created is None or datetime.fromisoformat(created) != datetime.fromisoformat(
        expected_created
    ):
        found.append(f"{HEADER_CREATED_AT} {created!r} != {expected_created!r}")
    if headers != wire:
        found.append(f"headers {headers!r} != {wire!r}")
    if not kafka and delivered.extra.get("delivery_mode") != 2:
        found.append(f"delivery_mode {delivered.extra.get('delivery_mode')} (not persistent)")
    return found


def check_deliveries(
    written: Iterable[Message],
    delivered: Iterable[Delivered],
    *,
    sequence: Callable[[Message], int] | None = None,
    kafka: bool = False,
) -> DeliveryReport:
    """Compare deliveries (in arrival order) with the messages written.

    Every delivery (duplicates too) must carry exactly the written id, body, content type,
    key, topic and headers. With ``sequence`` (each message's number within its key, in
    write order), the first delivery of each id must follow that order per key (per topic
    and key for Kafka, whose order is per partition); later copies of an id already
    delivered are counted as duplicates and otherwise ignored.
    """
    by_id: Mapping[str, Message] = {str(m.id): m for m in written}
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatches: list[str] = []
    violations: list[str] = []
    last: dict[object, tuple[int, str]] = {}
    count = duplicates = 0
    for item in delivered:
        count += 1
        message = by_id.get(item.id)
        if message is None:
            unexpected.append(item.id)
            continue
        if item.headers.get(HEADER_ID) != item.id:
            mismatches.append(f"{item.id}: {HEADER_ID} header {item.headers.get(HEADER_ID)!r}")
        mismatches += [f"{item.id}: {d}" for d in _differences(message, item, kafka)]
        if item.id in seen:
            duplicates += 1
            continue
        seen.add(item.id)
        if sequence is not None and message.key is not None:
            number = sequence(message)
            # Kafka orders a key within its partition, i.e. within one topic; one consumer
            # reading several topics sees their partitions interleaved in any order.
            scope = (message.topic, message.key) if kafka else message.key
            previous = last.get(scope)
            if previous is not None and number <= previous[0]:
                violations.append(
                    f"key {message.key!r} on {message.topic}: #{number} ({item.id}) arrived "
                    f"after #{previous[0]} ({previous[1]})"
                )
            last[scope] = (max(number, previous[0]) if previous else number, item.id)
    return DeliveryReport(
        written=len(by_id),
        deliveries=count,
        distinct=len(seen),
        missing=sorted(set(by_id) - seen),
        unexpected=unexpected,
        duplicates=duplicates,
        mismatches=mismatches,
        order_violations=violations,
    )


def read_kafka_to_end(
    bootstrap: str, topics: Sequence[str], within: float = 60.0
) -> list[Delivered]:
    """Everything now on ``topics``, read afresh from the first offset of each partition to
    its end (the high watermark when the read starts), in offset order per partition.

    The final word on what is on the wire: a live read-back can miss records (its fetch
    raced a write, or it stopped), this one asks again until each partition is read
    through, or fails after ``within`` seconds."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reread-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            "logger": QuietLog(),
        }
    )
    try:
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            described = consumer.list_topics(topic, timeout=10).topics[topic]
            for partition in described.partitions:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10
                )
                ends[(topic, partition)] = high
        records: dict[tuple[str, int], dict[int, Delivered]] = {key: {} for key in ends}
        reading = [TopicPartition(t, p, OFFSET_BEGINNING) for (t, p), high in ends.items() if high]
        consumer.assign(reading)
        deadline = time.monotonic() + within
        while any(max(records[key], default=-1) + 1 < high for key, high in ends.items()):
            if time.monotonic() > deadline:
                short = {
                    f"{t}[{p}]": f"{max(records[(t, p)], default=-1) + 1}/{high}"
                    for (t, p), high in ends.items()
                }
                raise AssertionError(f"cannot read {', '.join(topics)} to the end: {short}")
            for record in consumer.consume(num_messages=1000, timeout=0.2):
                name, partition, offset = record.topic(), record.partition(), record.offset()
                if record.error() is None and partition is not None and offset is not None:
                    records[(str(name), partition)][offset] = KafkaReadback._delivered(record)
        return [records[key][offset] for key in records for offset in sorted(records[key])]
    finally:
        consumer.close()


async def read_kafka(
    bootstrap: str, topic: str, count: int, within: float = 15.0
) -> list[Delivered]:
    """At least the first ``count`` messages on the existing ``topic``, read from the start."""
    readback = KafkaReadback(bootstrap, [topic], create=False)
    await asyncio.to_thread(readback.start)
    try:
        return await readback.wait_for(count, within)
    finally:
        await asyncio.to_thread(readback.close)
