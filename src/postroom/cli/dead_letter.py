"""``postroom dead-letter``: a consumer's dead letters on RabbitMQ or Kafka; see and requeue them.

A consumer dead-letters a message when its handler failed ``consumer_max_attempts`` times or
the message cannot be decoded: RabbitMQ puts the copy on the queue ``<consumer>.dead-letter``,
Kafka on the topic ``<consumer>.dead-letter``, with the headers ``postroom-error``,
``postroom-attempts``, ``postroom-topic``, ``postroom-consumer`` and
``postroom-dead-lettered-at``.

How each broker is read without losing anything:

- **RabbitMQ.** Listing takes messages with ``basic.get`` without acknowledging them, then
  hands them all back (``basic.nack`` with requeue); if the command dies, the broker hands
  them back itself when the connection closes. RabbitMQ puts them back where they were
  when it can, but the order may change. Requeueing publishes a copy (same message id,
  body and headers, without the dead-letter headers, so its attempts start again) to the
  consumer's queue ``<consumer>`` through the default exchange, waits for the publisher
  confirm, and only then acknowledges the dead letter.
- **Kafka.** A topic cannot delete a record, and other consumer groups read the same
  topics, so a dead letter is requeued by producing a copy to its original topic with the
  header ``postroom-for-consumer: <consumer>`` (other consumers acknowledge it without
  handling it). The consumer group ``<consumer>.dead-letter-cli`` remembers what was
  requeued: listing reads from its committed offsets (or the beginning) to the end without
  committing; requeueing commits past the requeued records, once Kafka confirmed every copy
  (``acks=all``), and only past records requeued without a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

import typer
from rich.table import Table

from postroom.brokers.base import (
    HEADER_ATTEMPTS,
    HEADER_CONSUMER,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR,
    HEADER_FOR_CONSUMER,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    dead_letter_name,
)
from postroom.cli.common import (
    EXIT_FAILED,
    console,
    error_console,
    fail,
    user_errors,
    with_settings,
)
from postroom.cli.output import (
    EXIT_USAGE,
    DryRun,
    Json,
    Yes,
    age,
    cell,
    confirm,
    failed,
    nothing_matches,
    payload_view,
    print_json,
    say,
    seconds_between,
    table,
    timestamp,
)
from postroom.config import Settings
from postroom.errors import BrokerUnavailableError, PostroomError
from postroom.log import configure_logging
from postroom.message import (
    HEADER_CONTENT_TYPE,
    HEADER_CREATED_AT,
    HEADER_ID,
    HEADER_KEY,
    OCTET_STREAM,
)
from postroom.urls import redact_url

app = typer.Typer(
    help=(
        "See a consumer's dead letters (its NAME.dead-letter queue on RabbitMQ, or topic "
        "on Kafka) and requeue them to the consumer.\n\n"
        "The broker is --broker-url (POSTROOM_BROKER_URL). **requeue** takes **--dry-run**, "
        "says how many dead letters it will send back and asks first (**--yes** to skip "
        "the question; required without a terminal). Nothing to list or requeue is not an "
        "error (exit 0)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

#: Dead letters shown (and put in ``--json``'s ``sample``) before a requeue.
SAMPLE_ROWS = 20
#: Seconds to wait for a broker to answer (connection, metadata, confirms).
BROKER_TIMEOUT = 15.0
#: Kafka: the suffix of the consumer group that remembers what was requeued.
CLI_GROUP_SUFFIX = ".dead-letter-cli"
#: Headers a dead-lettered copy carries that its requeued copy must not.
DEAD_LETTER_HEADERS = frozenset(
    {HEADER_ERROR, HEADER_ATTEMPTS, HEADER_CONSUMER, HEADER_DEAD_LETTERED_AT}
)
#: Kafka headers of the dead-letter copy that do not belong on the original topic.
KAFKA_COPY_HEADERS = frozenset(
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

ConsumerName = Annotated[
    str,
    typer.Option(
        "--consumer",
        "-c",
        envvar="POSTROOM_DEAD_LETTER_CONSUMER",
        metavar="NAME",
        help="The consumer whose dead letters these are (its postroom.Consumer name).",
        show_default=False,
    ),
]


# ----------------------------------------------------------------------------- model


@dataclass
class DeadLetter:
    """One dead-lettered message as read from the broker (not removed by reading it)."""

    id: str
    """The message id; without one, a digest of the message (``sha-...``)."""
    position: str
    """Where it is: ``#N`` in the queue as read (RabbitMQ), ``PARTITION:OFFSET`` (Kafka)."""
    body: bytes
    headers: dict[str, str]
    content_type: str
    key: str | None = None
    partition: int | None = None
    offset: int | None = None
    broker_timestamp: datetime | None = None

    @property
    def topic(self) -> str | None:
        """The topic it was first published to."""
        return self.headers.get(HEADER_TOPIC)

    @property
    def error(self) -> str | None:
        """Why it was dead-lettered."""
        return self.headers.get(HEADER_ERROR)

    @property
    def attempts(self) -> int | None:
        """Handler runs made before it was dead-lettered."""
        try:
            return int(self.headers[HEADER_ATTEMPTS])
        except (KeyError, ValueError):
            return None

    @property
    def dead_lettered_at(self) -> datetime | None:
        """When it was dead-lettered (the header, else the broker's timestamp)."""
        text = self.headers.get(HEADER_DEAD_LETTERED_AT)
        if text:
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(text)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        return self.broker_timestamp

    def is_called(self, name: str) -> bool:
        """True if ``name`` is its id or its position."""
        return name in {self.id, self.position}

    def summary(self) -> dict[str, Any]:
        """The facts ``ls`` shows, for ``--json``."""
        return {
            "id": self.id,
            "position": self.position,
            "topic": self.topic,
            "key": self.key,
            "attempts": self.attempts,
            "error": self.error,
            "dead_lettered_at": self.dead_lettered_at,
            "dead_lettered_by": self.headers.get(HEADER_CONSUMER),
            "content_type": self.content_type,
            "payload_bytes": len(self.body),
        }


def _digest(body: bytes, headers: dict[str, str]) -> str:
    """A stable name for a dead letter without a message id."""
    data = hashlib.sha256(body)
    for name in sorted(headers):
        if name not in DEAD_LETTER_HEADERS:
            data.update(f"\0{name}\0{headers[name]}".encode())
    return "sha-" + data.hexdigest()[:16]


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return None


@dataclass
class Listing:
    """What a look at the dead letters found."""

    letters: list[DeadLetter]
    total: int
    """All dead letters there (RabbitMQ: ready messages in the queue; Kafka: not requeued)."""
    missing: bool = False
    """The queue or topic does not exist (nothing was ever dead-lettered)."""


@dataclass
class Requeued:
    """What a requeue did."""

    requeued: list[DeadLetter] = field(default_factory=list)
    failures: list[tuple[DeadLetter, str]] = field(default_factory=list)
    still_listed: list[DeadLetter] = field(default_factory=list)
    """Kafka: requeued, but still listed because an earlier record was not requeued."""
    holding_back: list[DeadLetter] = field(default_factory=list)
    """Kafka: the records not requeued that keep ``still_listed`` listed."""
    vanished: list[DeadLetter] = field(default_factory=list)
    """Selected, but no longer there when requeued (someone else took them)."""


class DeadLetters(Protocol):
    """One consumer's dead letters on one broker."""

    where: str
    """Where they are, for sentences (never with a password)."""
    target: str
    """Where requeue sends them, for sentences."""
    order_note: str
    """How listing affects the order, for people."""

    async def browse(self, limit: int | None) -> Listing:
        """The first ``limit`` dead letters (all with None), leaving them where they are."""
        ...

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        """Send ``selected`` (as listed) back to the consumer, then remove them."""
        ...


class _Failure(PostroomError):
    """A broker operation the command could not do."""


# ----------------------------------------------------------------------------- RabbitMQ


class RabbitMQDeadLetters:
    """The queue ``<consumer>.dead-letter``, requeued to the queue ``<consumer>``."""

    order_note = (
        "Listing takes the messages without acknowledging them and hands them straight "
        "back; RabbitMQ keeps their place when it can, but the order may change."
    )

    def __init__(self, url: str, consumer: str) -> None:
        from postroom.brokers.rabbitmq import RabbitMQPublisher

        self._url = url
        self._password = urlsplit(url).password or ""
        self.address = RabbitMQPublisher(url).address
        self.consumer = consumer
        self.queue = dead_letter_name(consumer)
        self.where = f"RabbitMQ queue {self.queue!r} at {self.address}"
        self.target = f"the queue {consumer!r} (through the default exchange)"

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or repr(exc)
        if self._password:
            text = text.replace(self._password, "***")
        return f"{type(exc).__name__}: {text}"

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        import aio_pika
        import aiormq

        try:
            connection = await aio_pika.connect(
                self._url,
                timeout=BROKER_TIMEOUT,
                client_properties={"connection_name": "postroom dead-letter"},
            )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            raise BrokerUnavailableError(
                f"cannot connect to RabbitMQ at {self.address}: {self._describe(exc)}; check "
                "that RabbitMQ is running and that --broker-url (POSTROOM_BROKER_URL) is right"
            ) from None
        try:
            yield connection
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise BrokerUnavailableError(
                f"RabbitMQ at {self.address} failed during the command: {self._describe(exc)}; "
                "messages not yet acknowledged stay on the dead-letter queue"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), BROKER_TIMEOUT)

    async def _count(self, connection: Any, name: str) -> int | None:
        """Ready messages in queue ``name``, or None if it does not exist."""
        import aiormq

        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        count = queue.declaration_result.message_count
        with contextlib.suppress(Exception):
            await channel.close()
        return int(count or 0)

    def _letter(self, message: Any, index: int) -> DeadLetter:
        headers = {
            str(name): text
            for name, value in (message.headers or {}).items()
            if (text := _text(value)) is not None
        }
        message_id = message.message_id or headers.get(HEADER_ID)
        stamp = message.timestamp
        if isinstance(stamp, datetime) and stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return DeadLetter(
            id=message_id or _digest(message.body, headers),
            position=f"#{index + 1}",
            body=message.body,
            headers=headers,
            content_type=message.content_type or headers.get(HEADER_CONTENT_TYPE) or OCTET_STREAM,
            key=headers.get(HEADER_KEY),
            broker_timestamp=stamp if isinstance(stamp, datetime) else None,
        )

    async def _take(self, queue: Any, limit: int | None) -> list[Any]:
        held: list[Any] = []
        while limit is None or len(held) < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT)
            if message is None:
                break
            held.append(message)
        return held

    async def browse(self, limit: int | None) -> Listing:
        async with self._connection() as connection:
            total = await self._count(connection, self.queue)
            if total is None:
                return Listing([], 0, missing=True)
            channel = await connection.channel()
            queue = await channel.declare_queue(self.queue, passive=True)
            held = await self._take(queue, limit)
            letters = [self._letter(m, i) for i, m in enumerate(held)]
            if held:
                # One frame hands every message taken back to the queue.
                await held[-1].nack(multiple=True, requeue=True)
            await channel.close()
        return Listing(letters, max(total, len(letters)))

    def _copy(self, message: Any) -> Any:
        import aio_pika

        return aio_pika.Message(
            message.body,
            headers={
                name: value
                for name, value in (message.headers or {}).items()
                if name not in DEAD_LETTER_HEADERS
            },
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            type=message.type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        wanted = {letter.id for letter in selected}
        report = Requeued()
        async with self._connection() as connection:
            if await self._count(connection, self.consumer) is None:
                raise _Failure(
                    f"the consumer's queue {self.consumer!r} does not exist at {self.address}; "
                    "start the consumer once (`postroom consume ...`) so that it declares its "
                    "queue, then requeue; the dead letters were left where they are"
                )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            queue = await channel.declare_queue(self.queue, passive=True)
            # Look at no more than was there when we started, and requeue each id at most
            # once: a running consumer may dead-letter a copy again while this runs.
            waiting = queue.declaration_result.message_count or 0
            held: list[Any] = []
            found: set[str] = set()
            index = 0
            while index < waiting:
                message = await queue.get(no_ack=False, fail=False, timeout=BROKER_TIMEOUT)
                if message is None:
                    break
                letter = self._letter(message, index)
                index += 1
                if letter.id not in wanted or letter.id in found:
                    held.append(message)
                    continue
                found.add(letter.id)
                try:
                    # Waits for the publisher confirm; a return or nack raises.
                    await channel.default_exchange.publish(
                        self._copy(message),
                        routing_key=self.consumer,
                        mandatory=True,
                        timeout=BROKER_TIMEOUT,
                    )
                except Exception as exc:
                    report.failures.append((letter, self._describe(exc)))
                    held.append(message)
                    if channel.is_closed:
                        break  # what is not acknowledged goes back when the connection closes
                    continue
                await message.ack()
                report.requeued.append(letter)
            if held and not channel.is_closed:
                for message in held:
                    await message.nack(requeue=True)
            with contextlib.suppress(Exception):
                await channel.close()
        report.vanished = [letter for letter in selected if letter.id not in found]
        return report


# ----------------------------------------------------------------------------- Kafka


class _QuietLog:
    """librdkafka's log lines are not for the person at the terminal; failures raise."""

    def log(self, level: int, fmt: str, *args: Any) -> None:
        return None


class KafkaDeadLetters:
    """The topic ``<consumer>.dead-letter``, read by the group ``<consumer>.dead-letter-cli``."""

    order_note = "Listing commits nothing: what was not requeued stays listed, in partition order."

    def __init__(self, url: str, consumer: str) -> None:
        from postroom.brokers.kafka import parse_kafka_url

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

    def _unavailable(self, exc: BaseException) -> BrokerUnavailableError:
        detail = exc.args[0] if exc.args else exc
        text = (
            f"{detail.name()}: {detail.str()}"
            if hasattr(detail, "name") and hasattr(detail, "str")
            else str(exc)
        )
        return BrokerUnavailableError(
            f"Kafka at {self.servers} did not answer as needed ({text}); check that the "
            "brokers run and that --broker-url (POSTROOM_BROKER_URL) is right"
        )

    def _open(self) -> Any:
        import confluent_kafka

        settings = {
            key: value
            for key, value in self._config.items()
            if key
            not in {"enable.idempotence", "acks", "message.timeout.ms", "partitioner", "linger.ms"}
        }
        return confluent_kafka.Consumer(
            {
                "bootstrap.servers": self.servers,
                **settings,
                "group.id": self.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "logger": _QuietLog(),
            }
        )

    def _letter(self, record: Any) -> DeadLetter:
        headers = {
            name: (value.decode(errors="replace") if isinstance(value, bytes) else str(value))
            for name, value in (record.headers() or [])
            if value is not None
        }
        raw_key = record.key()
        key = raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else raw_key
        kind, millis = record.timestamp()
        position = f"{record.partition()}:{record.offset()}"
        body = record.value() or b""
        return DeadLetter(
            id=headers.get(HEADER_ID) or position,
            position=position,
            body=body,
            headers=headers,
            content_type=headers.get(HEADER_CONTENT_TYPE) or OCTET_STREAM,
            key=headers.get(HEADER_KEY, key),
            partition=record.partition(),
            offset=record.offset(),
            broker_timestamp=datetime.fromtimestamp(millis / 1000, UTC) if kind else None,
        )

    def _read(self, kafka: Any) -> tuple[list[DeadLetter], dict[int, int]] | None:
        """Every record from the CLI group's committed offsets to the end, and those offsets."""
        import confluent_kafka
        from confluent_kafka import KafkaError, KafkaException

        try:
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
                    confluent_kafka.TopicPartition(self.topic, tp.partition),
                    timeout=BROKER_TIMEOUT,
                )
                starts[tp.partition] = max(tp.offset, low) if tp.offset >= 0 else low
            kafka.assign(
                [confluent_kafka.TopicPartition(self.topic, p, starts[p]) for p in partitions]
            )
            letters: list[DeadLetter] = []
            at_end: set[int] = set()
            deadline = time.monotonic() + BROKER_TIMEOUT
            quiet_until: float | None = None
            while time.monotonic() < deadline:
                records = kafka.consume(num_messages=500, timeout=0.2)
                for record in records:
                    error = record.error()
                    if error is None:
                        at_end.discard(record.partition())
                        letters.append(self._letter(record))
                    elif error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(record.partition())
                    else:
                        raise KafkaException(error)
                if at_end.issuperset(partitions):
                    # End offsets can under-report right after a produce: look once more.
                    if quiet_until is None:
                        quiet_until = time.monotonic() + 0.5
                    elif time.monotonic() >= quiet_until and not records:
                        break
                else:
                    quiet_until = None
            else:
                raise _Failure(
                    f"reading {self.where} did not reach the end within {BROKER_TIMEOUT:g} s; "
                    "try again"
                )
        except KafkaException as exc:
            raise self._unavailable(exc) from None
        letters.sort(key=lambda letter: (letter.partition or 0, letter.offset or 0))
        return letters, starts

    def _close(self, kafka: Any) -> None:
        with contextlib.suppress(Exception):
            kafka.close()

    async def browse(self, limit: int | None) -> Listing:
        kafka = self._open()
        try:
            read = await asyncio.to_thread(self._read, kafka)
        finally:
            await asyncio.to_thread(self._close, kafka)
        if read is None:
            return Listing([], 0, missing=True)
        letters, _ = read
        ordered = sorted(
            letters,
            key=lambda letter: (
                letter.dead_lettered_at or datetime.min.replace(tzinfo=UTC),
                letter.partition or 0,
                letter.offset or 0,
            ),
        )
        return Listing(ordered if limit is None else ordered[:limit], len(letters))

    def _copy(self, letter: DeadLetter) -> Any:
        from postroom._uuid7 import uuid7
        from postroom.message import Message

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

    async def requeue(self, selected: Sequence[DeadLetter]) -> Requeued:
        import confluent_kafka
        from confluent_kafka import KafkaException

        from postroom.brokers.kafka import _CONSUMER_ONLY_SETTINGS, KafkaPublisher

        report = Requeued()
        kafka = self._open()
        try:
            read = await asyncio.to_thread(self._read, kafka)
            if read is None:
                report.vanished = list(selected)
                return report
            letters, starts = read
            wanted = {letter.position for letter in selected}
            chosen = [letter for letter in letters if letter.position in wanted]
            present = {letter.position for letter in chosen}
            report.vanished = [letter for letter in selected if letter.position not in present]
            sendable = []
            for letter in chosen:
                if letter.topic:
                    sendable.append(letter)
                else:
                    report.failures.append(
                        (letter, f"it has no {HEADER_TOPIC} header, so its topic is unknown")
                    )
            done: set[str] = set()
            if sendable:
                publisher = KafkaPublisher(
                    self.servers,
                    config={
                        k: v for k, v in self._config.items() if k not in _CONSUMER_ONLY_SETTINGS
                    },
                )
                try:
                    results = await publisher.publish([self._copy(x) for x in sendable])
                finally:
                    await publisher.close()
                for letter, result in zip(sendable, results, strict=True):
                    if result.confirmed:
                        done.add(letter.position)
                        report.requeued.append(letter)
                    else:
                        report.failures.append((letter, result.error or "not confirmed"))
            commits = []
            by_partition: dict[int, list[DeadLetter]] = {}
            for letter in letters:
                by_partition.setdefault(letter.partition or 0, []).append(letter)
            for partition, records in sorted(by_partition.items()):
                start = starts.get(partition, 0)
                end = start
                blocker: DeadLetter | None = None
                for letter in records:
                    if letter.position not in done:
                        blocker = letter
                        break
                    end = (letter.offset or 0) + 1
                later = [x for x in records if x.position in done and (x.offset or 0) >= end]
                if later and blocker is not None:
                    report.still_listed.extend(later)
                    report.holding_back.append(blocker)
                if end > start:
                    commits.append(confluent_kafka.TopicPartition(self.topic, partition, end))
            if commits:
                try:
                    await asyncio.to_thread(kafka.commit, offsets=commits, asynchronous=False)
                except KafkaException as exc:
                    raise _Failure(
                        f"the {len(report.requeued)} dead letters were requeued, but Kafka did "
                        f"not take the offsets of group {self.group!r} ({self._unavailable(exc)}); "
                        "they stay listed, and requeueing them again is harmless: the "
                        "consumer's inbox skips what it already handled"
                    ) from None
        finally:
            await asyncio.to_thread(self._close, kafka)
        return report


# ----------------------------------------------------------------------------- commands


def _broker(settings: Settings, consumer: str) -> DeadLetters:
    """The dead letters of ``consumer`` on the settings' broker; bad URLs exit 2."""
    from postroom.consumer.registry import Consumer

    with user_errors():
        Consumer(consumer)  # the name rules (it names queues and topics)
    try:
        scheme = urlsplit(settings.broker_url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme == "memory":
        fail(
            "a memory:// broker lives inside one process, so this command cannot reach it; "
            f"in tests, read MemoryBroker.messages({dead_letter_name(consumer)!r}) instead",
            EXIT_USAGE,
        )
    if scheme not in {"amqp", "amqps", "kafka"}:
        fail(
            f"the broker URL {redact_url(settings.broker_url)!r} is not a RabbitMQ (amqp://, "
            "amqps://) or Kafka (kafka://) URL; set --broker-url or POSTROOM_BROKER_URL",
            EXIT_USAGE,
        )
    kind = KafkaDeadLetters if scheme == "kafka" else RabbitMQDeadLetters
    with user_errors():
        broker: DeadLetters = kind(settings.broker_url, consumer)
    return broker


def _run(work: Callable[[], Any]) -> Any:
    """Run a broker coroutine; broker failures become sentences (exit 3)."""
    configure_logging(json=False, level="critical")
    with user_errors():
        return asyncio.run(work())


def _short(text: str | None, width: int = 60) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def _letters_table(title: str | None, letters: Iterable[DeadLetter]) -> Table:
    return table(
        title,
        ["id", "topic", "key", "attempts", "dead-lettered", "error"],
        [
            (
                letter.id,
                letter.topic,
                letter.key,
                letter.attempts,
                timestamp(letter.dead_lettered_at),
                _short(letter.error),
            )
            for letter in letters
        ],
    )


def _nothing_there(broker: DeadLetters, consumer: str, listing: Listing) -> str:
    why = " (it does not exist: nothing was dead-lettered yet)" if listing.missing else ""
    return f"No dead letters for consumer {consumer!r} in {broker.where}{why}."


@app.command("ls")
@with_settings("broker_url")
def list_letters(
    consumer: ConsumerName,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            "-n",
            envvar="POSTROOM_DEAD_LETTER_LIMIT",
            min=1,
            help="Show at most this many.",
        ),
    ] = 50,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """List a consumer's dead letters without removing them: id, original topic, key,
    attempts, error and when it was dead-lettered.

    Look at one with `dead-letter show`, send them back with `dead-letter requeue`.
    RabbitMQ: reading hands the messages straight back to the queue (their order may
    change). Kafka: only what was not requeued yet is listed.
    """
    broker = _broker(settings, consumer)
    listing: Listing = _run(lambda: broker.browse(limit))
    if as_json:
        print_json(
            {
                "consumer": consumer,
                "where": broker.where,
                "exists": not listing.missing,
                "matched": listing.total,
                "shown": len(listing.letters),
                "dead_letters": [letter.summary() for letter in listing.letters],
            }
        )
        return
    if not listing.letters:
        say(_nothing_there(broker, consumer, listing))
        return
    console.print(_letters_table(f"Dead letters of {consumer} in {broker.where}", listing.letters))
    more = "; raise --limit to see more" if listing.total > len(listing.letters) else ""
    say(f"{len(listing.letters)} of {listing.total} dead letters{more}. {broker.order_note}")


@app.command()
@with_settings("broker_url")
def show(
    consumer: ConsumerName,
    message_id: Annotated[
        str,
        typer.Argument(
            help="The dead letter's id as `dead-letter ls` shows it.",
            metavar="ID",
            show_default=False,
        ),
    ],
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Everything about one dead letter: its error, every header, the payload
    pretty-printed."""
    broker = _broker(settings, consumer)
    listing: Listing = _run(lambda: broker.browse(None))
    matches = [letter for letter in listing.letters if letter.is_called(message_id)]
    if not matches:
        failed(
            f"no dead letter {message_id!r} for consumer {consumer!r} in {broker.where}: "
            f"`postroom dead-letter ls --consumer {consumer}` lists them"
        )
    letter = matches[0]
    kind, view = payload_view(letter.body, letter.content_type)
    if as_json:
        document = letter.summary()
        document["headers"] = letter.headers
        document["payload_format"] = kind
        document["payload_base64"] = letter.body
        if kind in {"json", "text"}:
            document["payload"] = view
        document["copies"] = len(matches)
        print_json(document)
        return
    now = datetime.now(UTC)
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column(overflow="fold")
    for label, value in (
        ("id", letter.id),
        ("where", f"{broker.where}, {letter.position}"),
        ("topic", letter.topic),
        ("key", letter.key),
        ("attempts", letter.attempts),
        ("dead-lettered by", letter.headers.get(HEADER_CONSUMER)),
        (
            "dead-lettered",
            f"{timestamp(letter.dead_lettered_at)} "
            f"({age(seconds_between(now, letter.dead_lettered_at))} ago)"
            if letter.dead_lettered_at
            else None,
        ),
        ("content type", letter.content_type),
        ("payload size", f"{len(letter.body)} bytes"),
    ):
        fields.add_row(label, cell(value))
    console.print(fields)
    if len(matches) > 1:
        say(f"({len(matches)} dead letters have this id; this is the first.)")
    if letter.headers:
        console.print(table("Headers", ["name", "value"], sorted(letter.headers.items())))
    else:
        say("Headers: none")
    say(f"\nPayload ({kind}):")
    if kind == "json":
        say(json.dumps(view, indent=2, ensure_ascii=False))
    elif kind == "text":
        say(str(view))
    else:
        shown = "first 512 bytes" if len(letter.body) > 512 else f"{len(letter.body)} bytes"
        say(f"{view}\n({shown}, hex)")
    say(f"\nError:\n{letter.error or '-'}")
    say(
        "\nFix the cause, then send it back: "
        f"postroom dead-letter requeue --consumer {consumer} {letter.id}"
    )


def _requeue_json(
    report: Requeued | None, matched: list[DeadLetter], dry_run: bool
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "dry_run": dry_run,
        "matched": len(matched),
        "changed": 0 if report is None else len(report.requeued),
        "sample": [letter.summary() for letter in matched[:SAMPLE_ROWS]],
    }
    if report is not None:
        document.update(
            {
                "requeued": [letter.id for letter in report.requeued],
                "failed": [{"id": x.id, "error": why} for x, why in report.failures],
                "still_listed": [letter.summary() for letter in report.still_listed],
                "holding_back": [letter.summary() for letter in report.holding_back],
                "gone": [letter.id for letter in report.vanished],
            }
        )
    return document


@app.command()
@with_settings("broker_url")
def requeue(
    consumer: ConsumerName,
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            help="Ids of the dead letters to send back, as `dead-letter ls` shows them.",
            metavar="ID",
            show_default=False,
        ),
    ] = None,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            envvar="POSTROOM_DEAD_LETTER_ALL",
            help="Without ids: requeue every dead letter of the consumer.",
        ),
    ] = False,
    dry_run: DryRun = False,
    yes: Yes = False,
    as_json: Json = False,
    *,
    settings: Settings,
) -> None:
    """Send dead letters back to the consumer, then remove them from the dead letters.

    RabbitMQ: a copy (same message id, body and headers, attempts reset) goes to the
    consumer's queue, and the dead letter is acknowledged only after RabbitMQ confirmed the
    copy. Kafka: a copy goes to the message's original topic marked for this consumer only
    (other consumer groups skip it), and once Kafka confirmed it the group
    NAME.dead-letter-cli moves past it. Fix the cause first, or they come back. A message
    the consumer already handled is skipped by its inbox.
    """
    if not ids and not everything:
        fail(
            "say which dead letters to requeue: give their ids (see `postroom dead-letter ls "
            f"--consumer {consumer}`), or --all for every dead letter of {consumer!r}",
            EXIT_USAGE,
        )
    broker = _broker(settings, consumer)
    listing: Listing = _run(lambda: broker.browse(None))
    if ids:
        absent = [i for i in ids if not any(x.is_called(i) for x in listing.letters)]
        if absent:
            failed(
                f"no dead letter {', '.join(map(repr, absent))} for consumer {consumer!r} in "
                f"{broker.where}; nothing was requeued (`postroom dead-letter ls --consumer "
                f"{consumer}` lists them)"
            )
        matched = [x for x in listing.letters if any(x.is_called(i) for i in ids)]
    else:
        matched = list(listing.letters)
    if not matched:
        if not as_json:
            say(_nothing_there(broker, consumer, listing) + " Nothing to do.")
            raise typer.Exit(0)
        nothing_matches(
            "dead letters", {"consumer": consumer}, as_json=True, dry_run=dry_run, changed=0
        )
    count = len(matched)
    if not as_json:
        shown = f"first {SAMPLE_ROWS} of {count}" if count > SAMPLE_ROWS else str(count)
        console.print(_letters_table(f"Dead letters to requeue ({shown})", matched[:SAMPLE_ROWS]))
    if dry_run:
        if as_json:
            print_json(_requeue_json(None, matched, True))
        else:
            say(f"Dry run: would requeue {count} dead letters to {broker.target}; nothing changed.")
        return
    confirm(f"Requeue {count} dead letters from {broker.where} to {broker.target}?", yes=yes)
    report: Requeued = _run(lambda: broker.requeue(matched))
    if as_json:
        print_json(_requeue_json(report, matched, False))
    else:
        say(
            f"Requeued {len(report.requeued)} dead letters to {broker.target}; the consumer "
            "handles them again with a fresh set of attempts (its inbox skips any it "
            "already handled)."
        )
        for letter, why in report.failures:
            error_console.print(
                f"not requeued: {letter.id} ({why}); it stays a dead letter", highlight=False
            )
        if report.vanished:
            say(
                f"{len(report.vanished)} dead letters were gone by the time of the requeue "
                f"(someone else took them): {', '.join(x.id for x in report.vanished)}"
            )
        if report.still_listed:
            say(
                f"Requeued but still listed: {', '.join(x.id for x in report.still_listed)}. "
                "Kafka cannot delete records, and the group "
                f"{consumer + CLI_GROUP_SUFFIX!r} only moves past requeued records without a "
                "gap; these come after dead letters that were not requeued: "
                f"{', '.join(f'{x.id} ({x.position})' for x in report.holding_back)}. "
                "Requeue those (or --all) to clear the list; requeueing one twice is "
                "harmless, the consumer's inbox skips what it already handled."
            )
    if report.failures:
        raise typer.Exit(EXIT_FAILED)
