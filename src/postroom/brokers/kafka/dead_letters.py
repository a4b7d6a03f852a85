"""A consumer's dead letters on Kafka: the topic ``<consumer>.dead-letter``.

A topic cannot delete a record, and other consumer groups read the same topics, so a dead
letter is requeued by producing a copy to its original topic with the header
``postroom-for-consumer: <consumer>`` (other consumers acknowledge it without handling it).
The consumer group ``<consumer>.dead-letter-cli`` remembers what was requeued: reading
starts at its committed offsets (or the beginning) and runs to the end without committing;
requeueing commits past the requeued records, once Kafka confirmed every copy
(``acks=all``), and only past records requeued without a gap. Records are read as a stream
(librdkafka's local queue kept small), so memory does not grow with the topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from postroom._uuid7 import uuid7
from postroom.brokers.base import (
    HEADER_ERROR,
    HEADER_FOR_CONSUMER,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    MAX_ERROR_HEADER_CHARS,
    Outcome,
    dead_letter_headers,
    dead_letter_name,
)
from postroom.brokers.dead_letters import (
    BROKER_TIMEOUT,
    CLI_GROUP_SUFFIX,
    DEAD_LETTER_HEADERS,
    PAGE_SIZE,
    DeadLetter,
    DeadLetterError,
    Found,
    Listing,
    Requeued,
    first_match,
)
from postroom.brokers.kafka.producer import KafkaPublisher
from postroom.brokers.kafka.settings import (
    _CONSUMER_ONLY_SETTINGS,
    _log,
    parse_kafka_url,
    record_headers,
    record_key,
)
from postroom.errors import BrokerUnavailableError, ConfigurationError
from postroom.message import (
    ENVELOPE_HEADERS,
    HEADER_CONTENT_TYPE,
    HEADER_CREATED_AT,
    HEADER_ID,
    HEADER_KEY,
    OCTET_STREAM,
    Message,
)
from postroom.urls import scrub

if TYPE_CHECKING:
    from postroom.brokers.kafka.subscriber import KafkaDelivery

#: Headers of the dead-letter copy that do not belong on the original topic.
KAFKA_COPY_HEADERS: Final = frozenset(
    {
        HEADER_TOPIC,
        HEADER_PARTITION,
        HEADER_OFFSET,
        HEADER_ID,
        HEADER_CONTENT_TYPE,
        HEADER_CREATED_AT,
        HEADER_KEY,
        HEADER_FOR_CONSUMER,
    }
)
#: Producer-only settings kept out of the reading consumer.
_PRODUCER_ONLY: Final = frozenset(
    {"enable.idempotence", "acks", "message.timeout.ms", "partitioner", "linger.ms"}
)
#: Payload bytes of requeued copies held at once before they are produced.
_REQUEUE_PAGE_BYTES: Final = 16 * 1024 * 1024
#: librdkafka's local queue and fetch sizes while reading: a larger record still comes, one
#: at a time, and a full queue is fetched again after 10 ms (not librdkafka's 1 s).
_READ_BOUNDS: Final = {
    "queued.max.messages.kbytes": 1024,
    "fetch.max.bytes": 1024 * 1024,
    "max.partition.fetch.bytes": 1024 * 1024,
    "fetch.queue.backoff.ms": 10,
}

T = TypeVar("T")


class _QuietLog:
    """librdkafka's log lines are not for the person at the terminal; failures raise."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        return None


@dataclass
class _Scan:
    """An open read of the topic: where the CLI group starts, and the records from there."""

    starts: dict[int, int]
    records: Iterator[DeadLetter]
    kafka: Any


@dataclass
class _PartitionState:
    """How far the CLI group may commit in one partition while requeueing."""

    end: int
    blocker: DeadLetter | None = None
    later: list[DeadLetter] = field(default_factory=list)


class KafkaDeadLetters:
    """The topic ``<consumer>.dead-letter``, read by the group ``<consumer>.dead-letter-cli``."""

    order_note = "Listing commits nothing: what was not requeued stays listed, in partition order."

    def __init__(self, url: str, consumer: str) -> None:
        self._url = url
        self.servers, self._config = parse_kafka_url(url)
        self.consumer = consumer
        self.topic = dead_letter_name(consumer)
        self.group = consumer + CLI_GROUP_SUFFIX
        self.where = f"Kafka topic {self.topic!r} at {self.servers}"
        self.target = (
            f"each message's original topic, marked for {consumer!r} only "
            f"({HEADER_FOR_CONSUMER} header)"
        )

    async def browse(self, limit: int | None) -> Listing:
        """The first ``limit`` not requeued, oldest dead-lettered first, without payloads."""

        def earliest(scan: _Scan) -> Listing:
            counted = [0]

            def light() -> Iterator[DeadLetter]:
                for letter in scan.records:
                    counted[0] += 1
                    yield letter.without_payload()

            if limit is None:
                letters = sorted(light(), key=_listing_order)
            else:
                letters = heapq.nsmallest(limit, light(), key=_listing_order)
            return Listing(letters, counted[0])

        return await self._with_scan(earliest, Listing([], 0, missing=True))

    async def find(self, name: str) -> Found:
        """The first record called ``name`` (id or ``PARTITION:OFFSET``), read as a stream."""
        return await self._with_scan(
            lambda scan: first_match(scan.records, name), Found(None, missing=True)
        )

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        """Produce a copy of each selected record to its topic, then commit past them."""
        loop = asyncio.get_running_loop()
        publisher = KafkaPublisher(
            self.servers,
            config={k: v for k, v in self._config.items() if k not in _CONSUMER_ONLY_SETTINGS},
        )
        report = Requeued()

        def publish(page: list[DeadLetter]) -> list[Any]:
            future = asyncio.run_coroutine_threadsafe(
                publisher.publish([self._copy(x) for x in page]), loop
            )
            return future.result()

        try:
            done = await self._with_scan(
                lambda scan: self._requeue_stream(scan, selected, publish, report), None
            )
        finally:
            await publisher.close()
        if done is None:
            report.vanished = list(selected)
        return report

    # ------------------------------------------------------------------------- reading

    async def _with_scan(self, work: Callable[[_Scan], T], missing: T) -> T:
        def run() -> T:
            kafka = self._open()
            try:
                scan = self._scan(kafka)
                return missing if scan is None else work(scan)
            except KafkaException as exc:
                raise self._unavailable(exc) from None
            finally:
                with contextlib.suppress(Exception):
                    kafka.close()

        return await asyncio.to_thread(run)

    def _unavailable(self, exc: BaseException) -> BrokerUnavailableError:
        detail = exc.args[0] if exc.args else exc
        text = f"{detail.name()}: {detail.str()}" if isinstance(detail, KafkaError) else str(exc)
        return BrokerUnavailableError(
            f"Kafka at {self.servers} did not answer as needed ({text}); check that the "
            "brokers run and that --broker-url (POSTROOM_BROKER_URL) is right"
        )

    def _open(self) -> Any:
        settings = {k: v for k, v in self._config.items() if k not in _PRODUCER_ONLY}
        try:
            return self._consumer(settings)
        except KafkaException as exc:
            detail = exc.args[0] if exc.args else exc
            text = str(exc)
            if isinstance(detail, KafkaError):
                text = f"{detail.name()}: {detail.str()}"
            raise ConfigurationError(
                f"the Kafka client rejected the settings of the broker URL "
                f"({scrub(text, self._url)}); fix its ?setting=value options (librdkafka's "
                "names) in --broker-url (POSTROOM_BROKER_URL)"
            ) from None

    def _consumer(self, settings: dict[str, Any]) -> Any:
        return confluent_kafka.Consumer(
            {
                "bootstrap.servers": self.servers,
                **_READ_BOUNDS,
                **settings,
                "group.id": self.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "logger": _QuietLog(),
            }
        )

    def _scan(self, kafka: Any) -> _Scan | None:
        """Assign every partition from the CLI group's committed offsets (None: no topic)."""
        metadata = kafka.list_topics(self.topic, timeout=BROKER_TIMEOUT)
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        partitions = sorted(found.partitions)
        committed = kafka.committed(
            [confluent_kafka.TopicPartition(self.topic, p) for p in partitions],
            timeout=BROKER_TIMEOUT,
        )
        starts: dict[int, int] = {}
        for tp in committed:
            low, _high = kafka.get_watermark_offsets(
                confluent_kafka.TopicPartition(self.topic, tp.partition), timeout=BROKER_TIMEOUT
            )
            starts[tp.partition] = max(tp.offset, low) if tp.offset >= 0 else low
        kafka.assign([confluent_kafka.TopicPartition(self.topic, p, starts[p]) for p in partitions])
        return _Scan(starts, self._records(kafka, partitions), kafka)

    def _records(self, kafka: Any, partitions: list[int]) -> Iterator[DeadLetter]:
        """Every record to the end, in partition order within a partition, one at a time."""
        at_end: set[int] = set()
        deadline = time.monotonic() + BROKER_TIMEOUT
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            # One record at a time: a batch would hold its records' payloads all at once.
            records = kafka.consume(num_messages=1, timeout=0.2)
            got = bool(records)
            for record in records:
                error = record.error()
                if error is None:
                    at_end.discard(record.partition())
                    yield self._letter(record)
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(record.partition())
                else:
                    raise KafkaException(error)
            del records
            if at_end.issuperset(partitions):
                # End offsets can under-report right after a produce: look once more.
                if quiet_until is None:
                    quiet_until = time.monotonic() + 0.5
                elif time.monotonic() >= quiet_until and not got:
                    return
            else:
                quiet_until = None
        raise DeadLetterError(
            f"reading {self.where} did not reach the end within {BROKER_TIMEOUT:g} s; try again"
        )

    def _letter(self, record: Any) -> DeadLetter:
        headers = record_headers(record)
        key = record_key(record)
        kind, millis = record.timestamp()
        position = f"{record.partition()}:{record.offset()}"
        return DeadLetter(
            id=headers.get(HEADER_ID) or position,
            position=position,
            body=record.value() or b"",
            headers=headers,
            content_type=headers.get(HEADER_CONTENT_TYPE) or OCTET_STREAM,
            key=headers.get(HEADER_KEY, key),
            partition=record.partition(),
            offset=record.offset(),
            broker_timestamp=datetime.fromtimestamp(millis / 1000, UTC) if kind else None,
        )

    # ------------------------------------------------------------------------- requeueing

    def _requeue_stream(
        self,
        scan: _Scan,
        selected: Sequence[DeadLetter],
        publish: Callable[[list[DeadLetter]], list[Any]],
        report: Requeued,
    ) -> bool:
        """Requeue page by page as the records stream by, then commit what may be."""
        wanted = {letter.position for letter in selected}
        seen: set[str] = set()
        states = {p: _PartitionState(start) for p, start in scan.starts.items()}
        page: list[DeadLetter] = []
        page_bytes = 0

        def flush() -> None:
            sendable = [x for x in page if x.position in wanted and x.topic]
            done: set[str] = set()
            if sendable:
                for letter, result in zip(sendable, publish(sendable), strict=True):
                    light = letter.without_payload()
                    if result.confirmed:
                        done.add(letter.position)
                        report.requeued.append(light)
                    else:
                        report.failures.append((light, result.error or "not confirmed"))
            for letter in page:
                state = states.setdefault(letter.partition or 0, _PartitionState(0))
                if letter.position in wanted and not letter.topic:
                    report.failures.append(
                        (
                            letter.without_payload(),
                            f"it has no {HEADER_TOPIC} header, so its topic is unknown",
                        )
                    )
                if state.blocker is None and letter.position in done:
                    state.end = (letter.offset or 0) + 1
                elif state.blocker is None:
                    state.blocker = letter.without_payload()
                elif letter.position in done:
                    state.later.append(letter.without_payload())
            page.clear()

        for letter in scan.records:
            chosen = letter.position in wanted
            if chosen:
                seen.add(letter.position)
            page.append(letter if chosen else letter.without_payload())
            page_bytes += len(page[-1].body)
            if len(page) >= PAGE_SIZE or page_bytes >= _REQUEUE_PAGE_BYTES:
                flush()
                page_bytes = 0
        flush()
        report.vanished = [x for x in selected if x.position not in seen]
        commits = []
        for partition, state in sorted(states.items()):
            if state.later and state.blocker is not None:
                report.still_listed.extend(state.later)
                report.holding_back.append(state.blocker)
            if state.end > scan.starts.get(partition, 0):
                commits.append(confluent_kafka.TopicPartition(self.topic, partition, state.end))
        if commits:
            try:
                scan.kafka.commit(offsets=commits, asynchronous=False)
            except KafkaException as exc:
                raise DeadLetterError(
                    f"the {len(report.requeued)} dead letters were requeued, but Kafka did not "
                    f"take the offsets of group {self.group!r} ({self._unavailable(exc)}); they "
                    "stay listed, and requeueing them again is harmless: the consumer's inbox "
                    "skips what it already handled"
                ) from None
        return True

    def _copy(self, letter: DeadLetter) -> Message:
        from postroom._uuid7 import uuid7

        try:
            message_id = uuid.UUID(letter.headers.get(HEADER_ID, ""))
        except ValueError:
            message_id = uuid7()
        headers = {
            name: value
            for name, value in letter.headers.items()
            if name not in DEAD_LETTER_HEADERS and name not in KAFKA_COPY_HEADERS
        }
        headers[HEADER_FOR_CONSUMER] = self.consumer
        created = datetime.now(UTC)
        with contextlib.suppress(ValueError):
            created = datetime.fromisoformat(letter.headers.get(HEADER_CREATED_AT, ""))
        assert letter.topic is not None
        return Message(
            id=message_id,
            topic=letter.topic,
            body=letter.body,
            content_type=letter.content_type,
            created_at=created,
            available_at=created,
            key=letter.key,
            headers=headers,
        )


def _listing_order(letter: DeadLetter) -> tuple[datetime, int, int]:
    return (
        letter.dead_lettered_at or datetime.min.replace(tzinfo=UTC),
        letter.partition or 0,
        letter.offset or 0,
    )


async def produce_dead_letter(
    publisher: KafkaPublisher,
    topic: str,
    delivery: KafkaDelivery,
    group: str,
    error: str,
    attempts: int,
) -> None:
    """Produce ``delivery``'s dead-letter copy to ``topic`` (acks=all) and wait for Kafka to
    confirm it; a copy Kafka refuses as it is goes without its body (the headers say where
    the original is). Raises BrokerUnavailableError if it is not confirmed."""
    headers = dead_letter_headers(delivery, group, error, attempts)
    headers[HEADER_PARTITION] = str(delivery.partition)
    headers[HEADER_OFFSET] = str(delivery.offset)
    try:
        message_id = uuid.UUID(headers.get(HEADER_ID, ""))
    except ValueError:
        message_id = uuid7()
    content_type = headers.pop(HEADER_CONTENT_TYPE, None) or OCTET_STREAM
    for name in ENVELOPE_HEADERS:
        headers.pop(name, None)
    now = datetime.now(UTC)
    copy = Message(
        id=message_id,
        topic=topic,
        body=delivery.body,
        content_type=content_type,
        created_at=now,
        available_at=now,
        key=delivery.key,
        headers=headers,
    )
    (result,) = await publisher.publish([copy])
    if result.outcome is Outcome.REJECTED:
        # It can never be written as it is: write what must not be lost (where the
        # original is, and why) without the body. The original stays on its topic until
        # its retention, readable at that partition and offset.
        _log.error(
            "dead-letter copy refused by Kafka; writing it without its body",
            group=group,
            partition=f"{delivery.topic}[{delivery.partition}]",
            offset=delivery.offset,
            error=result.error,
        )
        headers = {k: v for k, v in headers.items() if k.startswith("postroom-")}
        headers[HEADER_ERROR] = (
            f"{error}; the copy with its body was refused by Kafka ({result.error}), so "
            f"it has no body: the original is at {delivery.topic}[{delivery.partition}] "
            f"offset {delivery.offset} until that topic's retention"
        )[:MAX_ERROR_HEADER_CHARS]
        copy = dataclasses.replace(copy, body=b"", content_type=OCTET_STREAM, headers=headers)
        (result,) = await publisher.publish([copy])
    if not result.confirmed:
        raise BrokerUnavailableError(
            f"the dead-letter copy was not confirmed by Kafka: {result.error}"
        )
