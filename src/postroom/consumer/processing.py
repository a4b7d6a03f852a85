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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from postroom.backoff import Backoff
from postroom.brokers.base import HEADER_FOR_CONSUMER, Delivery
from postroom.config import Settings
from postroom.consumer.decoding import IdSource, describe_error, to_message, to_model
from postroom.consumer.metrics import ConsumerMetrics
from postroom.consumer.registry import Consumer, HandlerSpec
from postroom.errors import UndecodableMessageError
from postroom.log import get_logger
from postroom.message import Message
from postroom.schema.inbox_sql import insert_inbox_sql

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


class _DatabaseUnavailable(Exception):
    """The database could not be reached; no attempt is counted."""


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
    ) -> None:
        self.consumer = consumer
        self.settings = settings
        self.metrics = metrics or ConsumerMetrics()
        self.id_source = IdSource.parse(settings.consumer_id_source)
        self.backoff = Backoff(settings.consumer_backoff_initial, settings.consumer_backoff_max)
        self.max_attempts = settings.consumer_max_attempts
        self._async_engine = async_engine
        self._sync_engine = sync_engine
        self._insert = text(insert_inbox_sql(settings.tables()))
        self.stopping = stopping or asyncio.Event()
        self._sleep = sleep
        self._reconnect = Backoff(initial=0.5, maximum=15.0)

    async def process(self, delivery: Delivery) -> Result:
        """Handle ``delivery`` under the retry policy and settle it with the broker."""
        meant_for = delivery.headers.get(HEADER_FOR_CONSUMER)
        if meant_for is not None and meant_for != self.consumer.name:
            # A dead letter of another consumer, requeued to the topic both read.
            self.metrics.skipped.labels(delivery.topic).inc()
            log.debug(
                "consumer.skipped",
                consumer=self.consumer.name,
                topic=delivery.topic,
                for_consumer=meant_for,
            )
            await self._ack(delivery)
            return Result(Disposition.SKIPPED)
        attempt = max(1, delivery.attempt)
        outages = 0
        message_id: str | None = None
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
                disposition = await self.attempt(spec, message, message_id)
            except UndecodableMessageError as exc:
                return await self._dead_letter(delivery, str(exc), attempt, message_id)
            except _DatabaseUnavailable as exc:
                outages += 1
                self.metrics.database_unavailable.inc()
                delay = self._reconnect.delay(outages)
                log.warning(
                    "consumer.database_unavailable",
                    consumer=self.consumer.name,
                    error=str(exc),
                    retry_in=round(delay, 2),
                )
                if not await self._wait(delay):
                    return Result(Disposition.ABANDONED, str(exc), attempt - 1, message_id)
                continue
            except Exception as exc:
                error = describe_error(exc)
                self.metrics.failures.labels(delivery.topic).inc()
                if attempt >= self.max_attempts:
                    log.warning(
                        "consumer.failed",
                        consumer=self.consumer.name,
                        topic=delivery.topic,
                        message_id=message_id,
                        attempt=attempt,
                        error=error,
                        final=True,
                    )
                    return await self._dead_letter(delivery, error, attempt, message_id)
                delay = self.backoff.delay(attempt)
                log.warning(
                    "consumer.failed",
                    consumer=self.consumer.name,
                    topic=delivery.topic,
                    message_id=message_id,
                    attempt=attempt,
                    error=error,
                    retry_in=round(delay, 3),
                    exc_info=True,
                )
                if delivery.redeliverable:
                    await delivery.retry_later(delay, error)
                    return Result(Disposition.RETRYING, error, attempt, message_id)
                if not await self._wait(delay):
                    return Result(Disposition.ABANDONED, error, attempt, message_id)
                attempt += 1
                continue
            await self._ack(delivery)
            return Result(disposition, None, attempt, message_id)

    async def attempt(self, spec: HandlerSpec, message: Message, message_id: str) -> Disposition:
        """One run: insert the inbox row, run the handler, commit. Raises what it raised."""
        argument = to_model(message, spec.model) if spec.model is not None else message
        params = {"consumer": self.consumer.name, "message_id": message_id}
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            if spec.is_async:
                new = await self._run_async(spec, argument, params)
            else:
                new = await asyncio.to_thread(self._run_sync, spec, argument, params)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise _DatabaseUnavailable(describe_error(exc.orig or exc)) from exc
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise _DatabaseUnavailable(describe_error(exc.orig or exc)) from exc
            raise
        finally:
            self.metrics.in_flight.dec()
        if not new:
            self.metrics.duplicates.labels(message.topic).inc()
            log.info(
                "consumer.duplicate",
                consumer=self.consumer.name,
                topic=message.topic,
                message_id=message_id,
            )
            return Disposition.DUPLICATE
        seconds = time.perf_counter() - started
        self.metrics.latency.labels(message.topic).observe(seconds)
        self.metrics.handled.labels(message.topic).inc()
        log.debug(
            "consumer.handled",
            consumer=self.consumer.name,
            topic=message.topic,
            message_id=message_id,
            seconds=round(seconds, 4),
        )
        return Disposition.HANDLED

    async def _run_async(self, spec: HandlerSpec, argument: Any, params: dict[str, str]) -> bool:
        async with AsyncSession(self._async_engine, expire_on_commit=False) as session:
            try:
                inserted = await self._record_async(session, params)
                if not inserted:
                    await session.rollback()
                    return False
                await spec.function(argument, session)
                await session.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await session.rollback()
                raise
            return True

    async def _record_async(self, session: AsyncSession, params: dict[str, str]) -> bool:
        try:
            return (await session.execute(self._insert, params)).first() is not None
        except sa_exc.DBAPIError as exc:
            # Not the message's fault (database down, tables missing): no attempt is spent.
            raise _DatabaseUnavailable(describe_error(exc.orig or exc)) from exc

    def _record_sync(self, session: Session, params: dict[str, str]) -> bool:
        try:
            return session.execute(self._insert, params).first() is not None
        except sa_exc.DBAPIError as exc:
            raise _DatabaseUnavailable(describe_error(exc.orig or exc)) from exc

    def _run_sync(self, spec: HandlerSpec, argument: Any, params: dict[str, str]) -> bool:
        with Session(self._sync_engine(), expire_on_commit=False) as session:
            try:
                inserted = self._record_sync(session, params)
                if not inserted:
                    session.rollback()
                    return False
                spec.function(argument, session)
                session.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    session.rollback()
                raise
            return True

    async def _dead_letter(
        self, delivery: Delivery, error: str, attempts: int, message_id: str | None
    ) -> Result:
        failures = 0
        while True:
            try:
                await delivery.dead_letter(error, attempts)
                break
            except Exception as exc:
                # Not acknowledged: for an ordered lane nothing after it may be committed,
                # so keep trying (with backoff) until it is stored or the consumer stops.
                failures += 1
                delay = self._reconnect.delay(failures)
                log.warning(
                    "consumer.dead_letter_failed",
                    consumer=self.consumer.name,
                    topic=delivery.topic,
                    message_id=message_id,
                    error=describe_error(exc),
                    retry_in=round(delay, 2),
                )
                if not await self._wait(delay):
                    return Result(Disposition.ABANDONED, error, attempts, message_id)
        self.metrics.dead_lettered.labels(delivery.topic).inc()
        log.warning(
            "consumer.dead_lettered",
            consumer=self.consumer.name,
            topic=delivery.topic,
            message_id=message_id,
            attempts=attempts,
            error=error,
        )
        return Result(Disposition.DEAD_LETTERED, error, attempts, message_id)

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception as exc:
            # The transaction committed: a redelivery finds the inbox row and is acknowledged.
            log.warning(
                "consumer.ack_failed",
                consumer=self.consumer.name,
                topic=delivery.topic,
                error=describe_error(exc),
            )

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the consumer stops first; False if it is stopping."""
        if self._sleep is not None:
            await self._sleep(seconds)
            return not self.stopping.is_set()
        if self.stopping.is_set():
            return False
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return True
        return False
