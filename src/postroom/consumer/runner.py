"""The consumer service: receive, handle in lanes, purge the inbox, serve metrics and health."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sqlalchemy import TextClause, text
from sqlalchemy.engine import Engine

from postroom.backoff import Backoff
from postroom.brokers.base import Delivery, ReportsLag, Subscriber
from postroom.config import Settings
from postroom.consumer.batching import BatchProcessor
from postroom.consumer.decoding import describe_error
from postroom.consumer.metrics import ConsumerMetrics
from postroom.consumer.processing import Disposition, Processor, Result
from postroom.database import create_async_engine, create_engine
from postroom.errors import BrokerUnavailableError, ConfigurationError
from postroom.lifecycle import PURGE_INTERVAL, Background, Lifecycle, purge_round, repeat
from postroom.log import get_logger
from postroom.schema.inbox_sql import purge_inbox_sql, purge_redeliveries_sql
from postroom.schema.tables import tables_for

if TYPE_CHECKING:
    from postroom.consumer.registry import Consumer

log = get_logger("consumer")

#: Seconds an ordered lane (a Kafka partition) without deliveries keeps its worker.
LANE_IDLE = 30.0
#: Longest wait of the receive loop for a delivery before it marks progress anyway.
RECEIVE_TURN = 1.0
#: Seconds a stopping consumer waits for handlers in flight.
STOP_GRACE = 30.0
#: Seconds between samples of the subscriber's lag (``postroom_consumer_lag_messages``).
LAG_SAMPLE_INTERVAL = 5.0
#: Longest wait for one lag sample (a broker that does not answer counts as a failure).
LAG_SAMPLE_TIMEOUT = 10.0
#: Most deliveries one batch may hold: one savepoint each, and PostgreSQL keeps 64 a
#: transaction in its subtransaction cache.
MAX_BATCH_SIZE = 64


@runtime_checkable
class ReportsMissingTopics(Protocol):
    """A subscriber that can tell which subscribed topics do not exist (yet) (Kafka)."""

    def missing_topics(self) -> list[str]:
        """The subscribed topics the broker does not know."""
        ...


def retry_window(settings: Settings) -> float:
    """Longest time a message can spend between its first and last attempt (no jitter)."""
    backoff = Backoff(settings.consumer_backoff_initial, settings.consumer_backoff_max)
    return sum(backoff.nominal(attempt) for attempt in range(1, settings.consumer_max_attempts))


def check_settings(settings: Settings) -> None:
    """Raise ConfigurationError for consumer settings that cannot work."""
    for name in (
        "consumer_prefetch",
        "consumer_concurrency",
        "consumer_max_attempts",
        "consumer_batch_size",
    ):
        if getattr(settings, name) < 1:
            raise ConfigurationError(
                f"{name} must be at least 1, got {getattr(settings, name)} "
                f"(set POSTROOM_{name.upper()})"
            )
    if settings.consumer_batch_size > MAX_BATCH_SIZE:
        raise ConfigurationError(
            f"consumer_batch_size must be at most {MAX_BATCH_SIZE}, got "
            f"{settings.consumer_batch_size}: each handler of a batch holds a savepoint, and "
            "past 64 of them PostgreSQL's subtransaction cache overflows and slows every "
            "session's snapshots (set POSTROOM_CONSUMER_BATCH_SIZE)"
        )
    for name in (
        "consumer_backoff_initial",
        "consumer_backoff_max",
        "consumer_batch_linger",
        "inbox_retention",
    ):
        if getattr(settings, name) < 0:
            raise ConfigurationError(f"{name} must not be negative (set POSTROOM_{name.upper()})")


class ConsumerService:
    """Runs a :class:`~postroom.Consumer` against a Subscriber until :meth:`stop`.

    Deliveries of one lane (a Kafka partition) are handled one after another, in order;
    different lanes, and deliveries without a lane (RabbitMQ), run concurrently up to
    ``consumer_concurrency`` handler runs at a time (a delivery waiting for its next attempt
    holds no slot). A lane never goes on past a delivery that was not settled (acknowledged
    or dead-lettered): the delivery is released (``release()``: Kafka seeks the partition
    back to it, RabbitMQ requeues it), and the lane's later records are dropped until the
    broker hands them out again.
    """

    def __init__(
        self,
        consumer: Consumer,
        subscriber: Subscriber,
        settings: Settings | None = None,
        *,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self.consumer = consumer
        self.subscriber = subscriber
        self.settings = settings or consumer.settings
        check_settings(self.settings)
        self.metrics = metrics or ConsumerMetrics()
        self._lifecycle = Lifecycle(
            "consumer",
            self.metrics.registry,
            metrics_port=self.settings.metrics_port_for("consumer"),
            metrics_host=self.settings.metrics_host,
            health_timeout=self.settings.health_timeout,
            healthy=self.healthy,
            ready=lambda: self.ready,
            identity={"consumer": consumer.name},
        )
        self._stopping = self._lifecycle.stopping
        # No pre-ping: a statement on a dropped connection fails as an outage, which costs
        # the message no attempt and is tried again on a fresh connection.
        self._async_engine = create_async_engine(
            self.settings.database_url,
            pool_size=self.settings.consumer_concurrency + 1,
            pre_ping=False,
        )
        self._sync_engine: Engine | None = None
        self._slots = asyncio.Semaphore(self.settings.consumer_concurrency)
        self.processor = Processor(
            consumer,
            self.settings,
            async_engine=self._async_engine,
            sync_engine=self._get_sync_engine,
            metrics=self.metrics,
            stopping=self._stopping,
            slots=self._slots,
        )
        self.batches = BatchProcessor(self.processor)
        self._batch_size = self.settings.consumer_batch_size
        self._batch_linger = self.settings.consumer_batch_linger
        # Deliveries without a lane, waiting for a batch worker (when batching).
        self._pool: asyncio.Queue[Delivery] = asyncio.Queue()
        self._batches_running = 0
        # Set when the pool grows or a batch ends: a waiting batch may start.
        self._batch_room = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lanes: dict[object, asyncio.Queue[Delivery]] = {}
        # Deliveries without a lane in hand at once (the broker's prefetch bounds it too).
        self._unordered = asyncio.Semaphore(
            max(self.settings.consumer_concurrency, self.settings.consumer_prefetch)
        )
        # Lanes stopped at an unsettled delivery that could not be released: lane -> epoch.
        self._broken: dict[object, object] = {}
        self._unsettled_streak = 0
        self._subscribed = False
        self._lag_failing = False
        self.started = asyncio.Event()
        """Set once the subscriber is connected and subscribed."""

    def _get_sync_engine(self) -> Engine:
        if self._sync_engine is None:
            self._sync_engine = create_engine(
                self.settings.database_url,
                pool_size=self.settings.consumer_concurrency,
                pre_ping=False,
            )
        return self._sync_engine

    def stop(self) -> None:
        """Finish the handlers in flight, leave the rest unacknowledged, and return from run()."""
        self._lifecycle.stop()

    @property
    def ready(self) -> bool:
        """True while subscribed to the broker, to every topic handled (a Kafka topic that
        does not exist yet makes the consumer not ready until it appears)."""
        if not self._subscribed or self._stopping.is_set():
            return False
        subscriber = self.subscriber
        return not (isinstance(subscriber, ReportsMissingTopics) and subscriber.missing_topics())

    def healthy(self) -> bool:
        """False when the receive loop has not turned, or one handler run has lasted,
        ``health_timeout`` seconds. A consumer without traffic stays healthy: its receive
        loop turns every :data:`RECEIVE_TURN` seconds whether or not a message came."""
        limit = self.settings.health_timeout
        return self._lifecycle.turning() and self.processor.longest_run() < limit

    async def run(self) -> None:
        """Subscribe and handle deliveries until :meth:`stop` (or cancellation)."""
        topics = self.consumer.topics
        if not topics:
            raise ConfigurationError(
                f"consumer {self.consumer.name!r} has no handlers; register one with "
                "@consumer.handler('topic') before running it"
            )
        self._warn_about_retention()
        background: list[Background] = []
        if self.settings.inbox_retention:
            background.append(("postroom-inbox-purge", self._purge_forever))
        if isinstance(self.subscriber, ReportsLag):
            background.append(("postroom-consumer-lag", self._sample_lag_forever))
        await self._lifecycle.run(
            lambda: self._work(topics),
            background=background,
            drain=self._finish,
            close=self._close,
            starting={
                "topics": topics,
                "concurrency": self.settings.consumer_concurrency,
                "prefetch": self.settings.consumer_prefetch,
                "max_attempts": self.settings.consumer_max_attempts,
            },
        )

    async def _work(self, topics: list[str]) -> None:
        """Subscribe, then receive until stopping or until receiving fails."""
        if not await self._subscribe(topics):
            return
        if not any(self._is_async(topic) for topic in topics):
            # Only async handlers run in batches: waiting to fill one would only delay.
            self._batch_size = 1
        if self._batch_size > 1:
            self._spawn(self._batch_pool())
        receive = asyncio.create_task(self._receive(), name="postroom-consumer-receive")
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({receive, stopping}, return_when=asyncio.FIRST_COMPLETED)
        self._stopping.set()
        receive.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            exc = await asyncio.gather(receive, return_exceptions=True)
            if exc and isinstance(exc[0], Exception):
                raise exc[0]

    def _is_async(self, topic: str) -> bool:
        spec = self.consumer.handler_for(topic)
        return spec is not None and spec.is_async

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.subscriber.close()
        self._subscribed = False
        await self._async_engine.dispose()
        if self._sync_engine is not None:
            self._sync_engine.dispose()

    async def _subscribe(self, topics: list[str]) -> bool:
        failures = 0
        reconnect = Backoff(initial=0.5, maximum=15.0)
        while not self._stopping.is_set():
            try:
                await self.subscriber.start(self.consumer.name, topics)
            except BrokerUnavailableError as exc:
                failures += 1
                delay = reconnect.delay(failures)
                log.warning("consumer.broker_unavailable", error=str(exc), retry_in=round(delay, 2))
                await self._lifecycle.pause(delay)
                continue
            self._subscribed = True
            self.started.set()
            log.info("consumer.ready", consumer=self.consumer.name, topics=topics)
            return True
        return False

    async def _receive(self) -> None:
        async with contextlib.aclosing(self._turning(self.subscriber.deliveries())) as turning:
            async for delivery in turning:
                if self._stopping.is_set():
                    return
                if delivery.lane is None:
                    await self._unordered.acquire()
                    if self._batch_size > 1:
                        self._pool.put_nowait(delivery)
                        self._batch_room.set()
                    else:
                        self._spawn(self._one(delivery))
                else:
                    queue = self._lanes.get(delivery.lane)
                    if queue is None:
                        queue = self._lanes[delivery.lane] = asyncio.Queue()
                        self._spawn(self._lane(delivery.lane, queue))
                    queue.put_nowait(delivery)

    async def _turning(self, deliveries: AsyncIterator[Delivery]) -> AsyncGenerator[Delivery, None]:
        """``deliveries``, marking progress at least every RECEIVE_TURN seconds while
        waiting for the next one (so health measures the loop, not the traffic)."""
        iterator = aiter(deliveries)
        waiting: asyncio.Future[Delivery] | None = None
        try:
            while True:
                if waiting is None:
                    waiting = asyncio.ensure_future(anext(iterator))
                done, _ = await asyncio.wait({waiting}, timeout=RECEIVE_TURN)
                self._lifecycle.progressed()
                if not done:
                    continue
                arrived, waiting = waiting, None
                try:
                    delivery = arrived.result()
                except StopAsyncIteration:
                    return
                yield delivery
        finally:
            if waiting is not None:
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, delivery: Delivery) -> None:
        try:
            result = await self._handle(delivery)
            if not _settled(result):
                await self._unsettled(delivery, result)
        finally:
            self._unordered.release()

    async def _lane(self, lane: object, queue: asyncio.Queue[Delivery]) -> None:
        try:
            idle_since = time.monotonic()
            while not self._stopping.is_set():
                try:
                    async with asyncio.timeout(0.25):
                        delivery = await queue.get()
                except TimeoutError:
                    if queue.empty() and time.monotonic() - idle_since > LANE_IDLE:
                        return
                    continue
                if delivery.revoked or self._is_broken(delivery):
                    continue
                batch = [delivery, *await self._more(queue, self._batch_linger)]
                results = await self._handle_batch(batch)
                for delivery, batched in zip(batch, results, strict=True):
                    if batched is None and (delivery.revoked or self._is_broken(delivery)):
                        continue
                    result = batched if batched is not None else await self._handle(delivery)
                    if not _settled(result):
                        if self._stopping.is_set():
                            return
                        # Nothing after it may be acknowledged: release it and drop the
                        # later records in hand; the broker hands them out again.
                        await self._unsettled(delivery, result)
                idle_since = time.monotonic()
        finally:
            if self._lanes.get(lane) is queue:
                del self._lanes[lane]

    async def _batch_pool(self) -> None:
        """Form batches of the deliveries without a lane and hand each to a task of its
        own, up to ``consumer_concurrency`` at a time, until stopping.

        A batch starts at once when none is running (an idle consumer adds no latency);
        while others run, only once a full batch is waiting, or when one of them ends.
        Many small batches side by side would cost CPU per message (the limit long before
        PostgreSQL is) and save nothing; slow handlers still get side-by-side batches,
        because deliveries pile up behind them.
        """
        running = asyncio.Semaphore(self.settings.consumer_concurrency)
        while not self._stopping.is_set():
            await running.acquire()
            first = await self._next_batch_start()
            if first is None:
                running.release()
                continue
            batch = [first, *await self._more(self._pool, self._batch_linger)]
            self._batches_running += 1
            self._spawn(self._pooled_batch(batch, running))

    async def _next_batch_start(self) -> Delivery | None:
        """The first delivery of the next batch, once the batch may start (see
        :meth:`_batch_pool`); None after a quarter second without one (to see stopping)."""
        try:
            async with asyncio.timeout(0.25):
                first = await self._pool.get()
        except TimeoutError:
            return None
        while (
            self._batches_running
            and self._pool.qsize() < self._batch_size - 1
            and not self._stopping.is_set()
        ):
            self._batch_room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await self._batch_room.wait()
        return first

    async def _pooled_batch(self, batch: list[Delivery], running: asyncio.Semaphore) -> None:
        try:
            results = await self._handle_batch(batch)
            for delivery, batched in zip(batch, results, strict=True):
                result = batched if batched is not None else await self._handle(delivery)
                if not _settled(result):
                    await self._unsettled(delivery, result)
        finally:
            self._batches_running -= 1
            self._batch_room.set()
            running.release()
            for _ in batch:
                self._unordered.release()

    async def _more(self, queue: asyncio.Queue[Delivery], linger: float) -> list[Delivery]:
        """Up to batch size - 1 more deliveries from ``queue``: those waiting, then those
        arriving within ``linger`` seconds. A lane's revoked or stopped records are dropped."""
        more: list[Delivery] = []
        if self._batch_size <= 1:
            return more
        deadline = time.monotonic() + linger
        while len(more) < self._batch_size - 1:
            try:
                delivery = queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        delivery = await queue.get()
                except TimeoutError:
                    break
            if delivery.lane is not None and (delivery.revoked or self._is_broken(delivery)):
                continue
            more.append(delivery)
        return more

    async def _handle_batch(self, batch: list[Delivery]) -> list[Result | None]:
        """Results of handling ``batch`` together (None: to be handled alone, in order)."""
        if len(batch) == 1:
            return [None]
        try:
            return await self.batches.process(batch)
        except Exception:
            # A bug: every delivery goes on alone; one the batch committed and acknowledged
            # finds its inbox row and is acknowledged again as a duplicate.
            log.exception("consumer.batch_error", consumer=self.consumer.name)
            return [None] * len(batch)

    async def _handle(self, delivery: Delivery) -> Result | None:
        try:
            result = await self.processor.process(delivery)
        except Exception:
            # A bug or a broker failure while settling: not acknowledged; it is released
            # (see _unsettled) and the broker delivers it again.
            log.exception("consumer.delivery_error", consumer=self.consumer.name)
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.exception("consumer.delivery_error", consumer=self.consumer.name)
            return None
        if _settled(result):
            self._unsettled_streak = 0
        return result

    async def _unsettled(self, delivery: Delivery, result: Result | None) -> None:
        """Give back a delivery that was neither acknowledged nor dead-lettered."""
        if result is None and not self._stopping.is_set():
            # It failed outside the handler (a bug, the broker while settling): wait a
            # little so a failure that repeats on every redelivery does not spin.
            self._unsettled_streak += 1
            delay = self.processor._reconnect.delay(self._unsettled_streak)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
        released = False
        try:
            released = await delivery.release()
        except Exception as exc:
            log.warning("consumer.release_failed", consumer=self.consumer.name, error=str(exc))
        if not released and delivery.lane is not None:
            # It cannot be fetched again yet: drop the lane's later records (of this
            # assignment) so none is acknowledged past it.
            self._broken[delivery.lane] = delivery.epoch
            log.warning(
                "consumer.lane_stopped",
                consumer=self.consumer.name,
                lane=str(delivery.lane),
                reason="a delivery was not settled and could not be released",
            )

    def _is_broken(self, delivery: Delivery) -> bool:
        if delivery.lane not in self._broken:
            return False
        epoch = delivery.epoch
        if epoch is not None and epoch != self._broken[delivery.lane]:
            del self._broken[delivery.lane]  # a new assignment: fetched again
            return False
        return True

    async def _finish(self) -> None:
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
            for task in late:
                task.cancel()
            if late:
                log.warning("consumer.stop_timeout", unfinished=len(late))
                await asyncio.gather(*late, return_exceptions=True)

    def _warn_about_retention(self) -> None:
        retention = self.settings.inbox_retention
        window = retry_window(self.settings)
        if retention and retention < window:
            log.warning(
                "consumer.retention_too_short",
                consumer=self.consumer.name,
                inbox_retention=retention,
                retry_window=window,
                advice=(
                    "inbox rows may be purged while a copy of their message can still "
                    "arrive, which would be handled again; raise POSTROOM_INBOX_RETENTION "
                    "above the retry window and any replay window"
                ),
            )

    async def _purge_forever(self) -> None:
        """Delete this consumer's inbox rows past their retention, a round a minute."""
        tables = tables_for(self.settings)
        inbox, counts = text(purge_inbox_sql(tables)), text(purge_redeliveries_sql(tables))
        params = {"consumer": self.consumer.name, "retention": self.settings.inbox_retention}

        def deleting(sql: TextClause) -> Callable[[int], Awaitable[int]]:
            async def delete(limit: int) -> int:
                async with self._async_engine.begin() as connection:
                    result = await connection.execute(sql, {**params, "limit": limit})
                return result.rowcount or 0

            return delete

        def purged(rows: int) -> None:
            self.metrics.inbox_purged.inc(rows)
            log.info("consumer.inbox_purged", consumer=self.consumer.name, rows=rows)

        def failed(exc: Exception) -> None:
            log.warning("consumer.inbox_purge_failed", error=describe_error(exc))

        async def round_() -> None:
            await purge_round(deleting(inbox), on_deleted=purged)
            # Redelivery counts left by messages settled without a committed handler run
            # (dead-lettered, retried, duplicates): kept as long as inbox rows, then dropped.
            await purge_round(deleting(counts))

        await repeat(round_, PURGE_INTERVAL, on_error=failed)

    async def _sample_lag_forever(self) -> None:
        """Sample the subscriber's lag into ``postroom_consumer_lag_messages`` every
        :data:`LAG_SAMPLE_INTERVAL` seconds while subscribed."""
        while True:
            await self._sample_lag()
            await asyncio.sleep(LAG_SAMPLE_INTERVAL)

    async def _sample_lag(self) -> None:
        """One sample. A failure is logged once (until a sample works again) and drops the
        series until a sample works (a stale number would keep an alert firing): the lag
        must never hold back or stop the consumer."""
        subscriber = self.subscriber
        if not isinstance(subscriber, ReportsLag):
            return
        if not self._subscribed:
            self.metrics.set_lag({})
            return
        try:
            async with asyncio.timeout(LAG_SAMPLE_TIMEOUT):
                lag = await subscriber.lag()
        except Exception as exc:  # a broker that cannot tell now is no reason to stop
            self.metrics.set_lag({})
            if not self._lag_failing:
                self._lag_failing = True
                log.warning(
                    "consumer.lag_sample_failed",
                    consumer=self.consumer.name,
                    error=describe_error(exc),
                    advice="postroom_consumer_lag_messages has no series until a sample works",
                )
            return
        self._lag_failing = False
        self.metrics.set_lag(lag)


def _settled(result: Result | None) -> bool:
    """True once the broker was told the delivery is done (or it went back to the broker)."""
    if result is None:
        return False
    return result.disposition not in {Disposition.ABANDONED, Disposition.FAILED}
