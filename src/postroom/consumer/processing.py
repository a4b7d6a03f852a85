"""One message through a consumer: inbox row first, handler, commit, then acknowledge.

The retry policy lives here too, so every broker (and :mod:`postroom.testing`) follows
the same rules: a failed run rolls back and is retried with capped exponential backoff and
jitter, by the broker if it can redeliver later (RabbitMQ, memory), else in place (Kafka,
holding back only that partition); after the last attempt the message is dead-lettered
with its error, then acknowledged. Nothing is acknowledged before the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from postroom import correlation, tracing
from postroom.backoff import Backoff
from postroom.brokers.base import HEADER_FOR_CONSUMER, Delivery
from postroom.config import Settings
from postroom.consumer.decoding import (
    MAX_NAME_CHARS,
    IdSource,
    describe_error,
    is_requeue_copy,
    to_message,
    to_model,
)
from postroom.consumer.isolation import HandlerGate
from postroom.consumer.metrics import OTHER_TOPIC, ConsumerMetrics
from postroom.consumer.transactions import (
    DatabaseUnavailable,
    HandlerTransactions,
    connection_failed,
    inbox_errors,
)
from postroom.errors import (
    DeliveryLostError,
    HandlerCancelledError,
    UndecodableMessageError,
)
from postroom.log import get_logger
from postroom.message import Message, message_size
from postroom.schema.inbox_sql import (
    count_redelivery_sql,
    forget_redeliveries_sql,
    insert_inbox_sql,
)
from postroom.schema.tables import tables_for

if TYPE_CHECKING:
    from postroom.consumer.registry import Consumer, HandlerSpec

log = get_logger("consumer")


class Disposition(enum.Enum):
    """What became of one delivery."""

    HANDLED = "handled"
    """The handler ran and its transaction, with the inbox row, committed; acknowledged."""
    DUPLICATE = "duplicate"
    """The inbox already held the message: acknowledged without running the handler."""
    SKIPPED = "skipped"
    """Meant for another consumer (a requeued dead letter on a shared Kafka topic):
    acknowledged without running the handler or writing an inbox row."""
    FAILED = "failed"
    """The handler raised; its transaction rolled back (the message will be retried)."""
    RETRYING = "retrying"
    """Failed, and handed back to the broker to come again after a backoff."""
    DEAD_LETTERED = "dead_lettered"
    """Put on the dead-letter queue or topic with its error, then acknowledged."""
    ABANDONED = "abandoned"
    """Not finished because the consumer is stopping; the broker will deliver it again."""


@dataclass(frozen=True)
class Result:
    """The disposition of a delivery, with the last error and the attempts made."""

    disposition: Disposition
    error: str | None = None
    attempts: int = 0
    message_id: str | None = None


def handler_cancelled() -> HandlerCancelledError:
    """The failure of a handler that let CancelledError escape while nothing was stopping."""
    return HandlerCancelledError(
        "the handler raised CancelledError (it awaited something that was "
        "cancelled) while the consumer was not stopping"
    )


@contextlib.contextmanager
def handler_context(delivery: Delivery, message_id: str, consumer: str) -> Iterator[None]:
    """The context a handler of ``delivery`` runs in: its CONSUMER span (see
    :mod:`postroom.tracing`), and the correlation and causation ids messages enqueued in it
    get (see :mod:`postroom.correlation`)."""
    system = tracing.messaging_system(delivery)
    with (
        tracing.processing(delivery.headers, delivery.topic, message_id, consumer, system),
        correlation.handling(delivery.headers, message_id),
    ):
        yield


def being_cancelled() -> bool:
    """True when the current task is being cancelled (the consumer is stopping)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Processor:
    """Runs deliveries through a consumer's handlers against the database."""

    def __init__(
        self,
        consumer: Consumer,
        settings: Settings,
        *,
        async_engine: AsyncEngine,
        sync_engine: Callable[[], Engine],
        metrics: ConsumerMetrics | None = None,
        stopping: asyncio.Event | None = None,
        sleep: Callable[[float], Any] | None = None,
        slots: asyncio.Semaphore | None = None,
        max_outages: int | None = None,
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.metrics = metrics or ConsumerMetrics()
        self.id_source = IdSource.parse(settings.consumer_id_source)
        self.backoff = Backoff(settings.consumer_backoff_initial, settings.consumer_backoff_max)
        self.max_attempts = settings.consumer_max_attempts
        self._async_engine = async_engine
        tables = tables_for(settings)
        self.transactions = HandlerTransactions(
            text(insert_inbox_sql(tables)), async_engine, sync_engine
        )
        """Where each handler runs, in the transaction of its inbox row."""
        self._count_redelivery = text(count_redelivery_sql(tables))
        self._forget_redeliveries = text(forget_redeliveries_sql(tables))
        self.max_message_bytes = settings.consumer_max_message_bytes
        self.stopping = stopping or asyncio.Event()
        self._sleep = sleep
        self._reconnect = Backoff(initial=0.5, maximum=15.0)
        self._slots = slots
        """Held around each handling attempt only (never while waiting for a retry)."""
        self._max_outages = max_outages
        """Consecutive 'database unavailable' rounds after which the error is raised."""
        self._running: dict[object, float] = {}
        """Handler runs in progress and when (monotonic) each began."""
        self.gate = HandlerGate()
        """Redelivered messages run alone, so a crash is pinned on the right one."""

    @property
    def async_engine(self) -> AsyncEngine:
        """The engine handler runs and batches take their connections from."""
        return self._async_engine

    def longest_run(self) -> float:
        """Seconds the oldest handler run in progress has lasted (0 when none runs)."""
        started = min(self._running.values(), default=None)
        return 0.0 if started is None else time.monotonic() - started

    async def process(self, delivery: Delivery) -> Result:
        """Handle ``delivery`` under the retry policy and settle it with the broker."""
        return await self.process_from(delivery, max(1, delivery.attempt))

    async def process_from(self, delivery: Delivery, attempt: int) -> Result:
        """:meth:`process`, with ``attempt`` as the number of the first run here (earlier
        ones were made elsewhere, in a batch)."""
        meant_for = delivery.headers.get(HEADER_FOR_CONSUMER)
        if meant_for is not None and meant_for != self.consumer.name:
            if is_requeue_copy(delivery.headers):
                # A dead letter of another consumer, requeued to the topic both read.
                self.metrics.skipped.labels(self.label(delivery.topic)).inc()
                log.debug("consumer.skipped", **self.about(delivery.topic), for_consumer=meant_for)
                await self.acknowledge(delivery)
                return Result(Disposition.SKIPPED)
            # Not a copy postroom made: the header means nothing; handle the message.
            log.warning(
                "consumer.foreign_for_consumer_header",
                **self.about(delivery.topic),
                for_consumer=meant_for[:MAX_NAME_CHARS],
                advice=(
                    f"the {HEADER_FOR_CONSUMER} header is only honoured on postroom's own "
                    "requeue copies; this message is handled as any other: find the "
                    "producer that sets it"
                ),
            )
        size = message_size(delivery.body, delivery.headers)
        if size > self.max_message_bytes:
            # Never handed to a handler, and the copy goes without the body (what is too
            # large); the headers say where it came from and why.
            delivery.body = b""
            error = (
                f"message of {size} bytes exceeds consumer_max_message_bytes "
                f"{self.max_message_bytes}; it is dead-lettered without its body: send a "
                "reference to the data instead, or raise POSTROOM_CONSUMER_MAX_MESSAGE_BYTES"
            )
            return await self._dead_letter(delivery, error, 0, None)
        outages = 0
        message_id: str | None = None
        counted = not delivery.redelivered
        while True:
            try:
                message_id = self.id_source.read(delivery)
                message = to_message(delivery, message_id)
                spec = self.consumer.handler_for(delivery.topic)
                if spec is None:
                    raise UndecodableMessageError(
                        f"consumer {self.consumer.name!r} has no handler for topic "
                        f"{delivery.topic!r}; register one with @consumer.handler"
                        f"({delivery.topic!r}) and replay the message"
                    )
                gate = self.gate.alone() if delivery.redelivered else self.gate.shared()
                async with gate:
                    if not counted:
                        ended = await self._count_ending(message_id)
                        counted = True
                        if ended > self.max_attempts:
                            return await self._crash_looped(delivery, ended, message_id)
                    with handler_context(delivery, message_id, self.consumer.name):
                        disposition = await self.attempt(
                            spec, message, message_id, forget=delivery.redelivered
                        )
            except UndecodableMessageError as exc:
                return await self._dead_letter(delivery, str(exc), attempt, message_id)
            except DatabaseUnavailable as exc:
                outages += 1
                self.metrics.database_unavailable.inc()
                if self._max_outages is not None and outages >= self._max_outages:
                    raise (exc.__cause__ or exc) from None
                delay = self._reconnect.delay(outages)
                log.warning(
                    "consumer.database_unavailable",
                    consumer=self.consumer.name,
                    error=str(exc),
                    retry_in=round(delay, 2),
                )
                if not await self._wait(delay) or delivery.revoked:
                    return Result(Disposition.ABANDONED, str(exc), attempt - 1, message_id)
                continue
            except Exception as exc:
                failed = await self.failed(delivery, exc, attempt, message_id)
                if failed is not None:
                    return failed
                attempt += 1
                continue
            await self.acknowledge(delivery)
            return Result(disposition, None, attempt, message_id)

    async def failed(
        self, delivery: Delivery, exc: Exception, attempt: int, message_id: str | None
    ) -> Result | None:
        """Settle a failed ``attempt`` by the retry policy: dead-letter it after the last
        attempt, hand it back to the broker for later, or wait the backoff in place and
        return None (the caller runs attempt + 1)."""
        error = describe_error(exc)
        self.metrics.failures.labels(self.label(delivery.topic)).inc()
        final = attempt >= self.max_attempts
        delay = 0.0 if final else self.backoff.delay(attempt)
        log.warning(
            "consumer.failed",
            **self.about(delivery.topic, message_id=message_id),
            attempt=attempt,
            error=error,
            **({"final": True} if final else {"retry_in": round(delay, 3), "exc_info": True}),
        )
        if final:
            return await self._dead_letter(delivery, error, attempt, message_id)
        if delivery.redeliverable:
            try:
                await delivery.retry_later(delay, error)
            except DeliveryLostError:
                return Result(Disposition.ABANDONED, error, attempt, message_id)
            return Result(Disposition.RETRYING, error, attempt, message_id)
        if not await self._wait(delay) or delivery.revoked:
            # Stopping, or the partition went to another member, which takes over.
            return Result(Disposition.ABANDONED, error, attempt, message_id)
        return None

    async def _count_ending(self, message_id: str) -> int:
        """Count one more redelivery of ``message_id`` (its own committed transaction) and
        return how many there were: each means a holder of the message ended (a process
        that died in the handler, or one that stopped or released it) before it settled."""
        params = {"consumer": self.consumer.name, "message_id": message_id}
        try:
            async with self._async_engine.begin() as connection:
                with inbox_errors():
                    return int((await connection.execute(self._count_redelivery, params)).one()[0])
        except sa_exc.DBAPIError as exc:  # beginning or committing failed
            raise DatabaseUnavailable(describe_error(exc.orig or exc)) from exc

    async def _crash_looped(self, delivery: Delivery, ended: int, message_id: str) -> Result:
        error = (
            f"the consumer process ended {ended} times while handling this message "
            f"(consumer_max_attempts {self.max_attempts}); it is dead-lettered without "
            "running the handler again: find why the handler kills the process, then replay it"
        )
        return await self._dead_letter(delivery, error, ended, message_id)

    async def _forget_count(self, topic: str, message_id: str) -> None:
        """Delete the redelivery count of a message that was dead-lettered, so a copy
        requeued later starts afresh (best effort: the retention purge removes it anyway)."""
        params = {"consumer": self.consumer.name, "message_id": message_id}
        try:
            async with self._async_engine.begin() as connection:
                await connection.execute(self._forget_redeliveries, params)
        except Exception as exc:
            log.warning(
                "consumer.redelivery_count_not_cleared",
                **self.about(topic, message_id=message_id),
                error=describe_error(exc),
            )

    async def attempt(
        self, spec: HandlerSpec, message: Message, message_id: str, *, forget: bool = False
    ) -> Disposition:
        """One run: insert the inbox row, run the handler, commit (see
        :meth:`HandlerTransactions.run`). Raises what it raised.

        ``forget``: also delete the message's redelivery count in the same transaction
        (only redelivered deliveries can have one, so first deliveries skip the statement).
        """
        argument = to_model(message, spec.model) if spec.model is not None else message
        if spec.batch:  # a batch handler handles a message alone as a list of one
            argument = [argument]
        params = {"consumer": self.consumer.name, "message_id": message_id}
        forget_sql = self._forget_redeliveries if forget else None
        async with self.handler_run():
            started = time.perf_counter()
            try:
                new = await self.transactions.run(spec, argument, params, forget_sql)
            except sa_exc.DBAPIError as exc:
                if connection_failed(exc):
                    raise DatabaseUnavailable(describe_error(exc.orig or exc)) from exc
                raise
            except asyncio.CancelledError as exc:
                if being_cancelled():
                    raise
                # Not the consumer stopping: the handler let a cancelled sub-task's
                # CancelledError escape. That is a failure of this attempt.
                raise handler_cancelled() from exc
        if not new:
            self.metrics.duplicates.labels(self.label(message.topic)).inc()
            log.info("consumer.duplicate", **self.about(message.topic, message_id=message_id))
            return Disposition.DUPLICATE
        seconds = time.perf_counter() - started
        self.metrics.latency.labels(self.label(message.topic)).observe(seconds)
        self.metrics.handled.labels(self.label(message.topic)).inc()
        log.debug(
            "consumer.handled",
            **self.about(message.topic, message_id=message_id),
            seconds=round(seconds, 4),
        )
        return Disposition.HANDLED

    @contextlib.asynccontextmanager
    async def handler_run(self) -> AsyncIterator[Callable[[], None]]:
        """Hold a concurrency slot for one handler run (or one batch of them), counted in
        flight and for the health probe's longest run; yields a function a batch calls as
        each of its handlers starts, so that the probe times one handler, not the batch."""
        async with self._slots if self._slots is not None else contextlib.nullcontext():
            self.metrics.in_flight.inc()
            run = object()
            self._running[run] = time.monotonic()

            def handler_started() -> None:
                self._running[run] = time.monotonic()

            try:
                yield handler_started
            finally:
                self.metrics.in_flight.dec()
                del self._running[run]

    def label(self, topic: str) -> str:
        """The metric label of ``topic``: itself if the consumer handles it, else ``other``
        (labels come from a closed set, whatever topics arrive)."""
        return topic if self.consumer.handler_for(topic) is not None else OTHER_TOPIC

    def about(self, topic: str, **fields: Any) -> dict[str, Any]:
        """The fields that name a message in this consumer's log events, with ``fields``."""
        return {"consumer": self.consumer.name, "topic": topic, **fields}

    async def _dead_letter(
        self, delivery: Delivery, error: str, attempts: int, message_id: str | None
    ) -> Result:
        failures = 0
        while True:
            if delivery.revoked:
                # The partition went to another member: it handles the record again.
                return Result(Disposition.ABANDONED, error, attempts, message_id)
            try:
                await delivery.dead_letter(error, attempts)
                break
            except DeliveryLostError:
                # Its channel is gone: the broker hands the message out again.
                return Result(Disposition.ABANDONED, error, attempts, message_id)
            except Exception as exc:
                # Not acknowledged: for an ordered lane nothing after it may be committed,
                # so keep trying (with backoff) until it is stored or the consumer stops.
                failures += 1
                self.metrics.dead_letter_failures.inc()
                delay = self._reconnect.delay(failures)
                log.error(
                    "consumer.dead_letter_failed",
                    **self.about(delivery.topic, message_id=message_id),
                    error=describe_error(exc),
                    retry_in=round(delay, 2),
                )
                if not await self._wait(delay):
                    return Result(Disposition.ABANDONED, error, attempts, message_id)
        self.metrics.dead_lettered.labels(self.label(delivery.topic)).inc()
        log.warning(
            "consumer.dead_lettered",
            **self.about(delivery.topic, message_id=message_id),
            attempts=attempts,
            error=error,
        )
        if message_id is not None:
            await self._forget_count(delivery.topic, message_id)
        return Result(Disposition.DEAD_LETTERED, error, attempts, message_id)

    async def acknowledge(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` after its commit; a failed ack is only logged (a
        redelivery finds the inbox row)."""
        try:
            await delivery.ack()
        except Exception as exc:
            # The transaction committed: a redelivery finds the inbox row and is acknowledged.
            log.warning(
                "consumer.ack_failed", **self.about(delivery.topic), error=describe_error(exc)
            )

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the consumer stops first; False if it is stopping."""
        if self._sleep is not None:
            await self._sleep(seconds)
            return not self.stopping.is_set()
        if self.stopping.is_set():
            return False
        try:
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        except TimeoutError:
            return True
        return False
