"""The relay: claim → publish → mark, for as long as it runs, on its share of the partitions."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from postroom.backoff import Backoff
from postroom.brokers.base import Outcome, Publisher, PublishResult
from postroom.config import Settings
from postroom.errors import (
    BrokerRefusedError,
    BrokerUnavailableError,
    ConfigurationError,
    DatabaseError,
)
from postroom.lifecycle import PURGE_INTERVAL, Every, Lifecycle, purge_round, repeat
from postroom.log import get_logger
from postroom.metrics import RelayMetrics
from postroom.relay.batches import Batches
from postroom.relay.leases import PartitionLeases
from postroom.relay.ordering import publish_in_key_order
from postroom.relay.stages import observe_stages
from postroom.relay.store import (
    CONFIRMED,
    HELD,
    REFUSED,
    REJECTED,
    UNAVAILABLE,
    BatchOutcomes,
    Claim,
    ClaimedRow,
    Connection,
    MarkedRow,
    OutboxStore,
)
from postroom.relay.wakeup import Wakeup
from postroom.schema.tables import DEAD, PUBLISHED, tables_for
from postroom.urls import psycopg_conninfo, redact_text

log = get_logger("relay")

#: The marks' connection commits without waiting for the WAL flush. A mark is only ever
#: lost by a crash of PostgreSQL itself (the last fraction of a second of commits), and its
#: rows are then published again: a duplicate, never a loss, as after a relay crash
#: between the broker's confirm and the mark. It keeps one fsync per batch off the path
#: that the next batch waits on, and off the disk the application's commits share.
MARK_SESSION_SETTINGS: Final = {"synchronous_commit": "off"}
#: Broker states recorded in ``<outbox>_relays`` with each heartbeat.
BROKER_CONNECTING: Final = "connecting"
BROKER_CONNECTED: Final = "connected"
BROKER_UNAVAILABLE: Final = "unavailable"
#: Longest broker error kept in ``<outbox>_relays``.
MAX_BROKER_ERROR_CHARS: Final = 500
#: Seconds between refreshes of the backlog gauges (and looks at the purge's schedule).
HOUSEKEEPING_INTERVAL: Final = 10.0


def default_relay_id() -> str:
    """``host-pid-random``: unique per process, readable in leases and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Relay:
    """Publishes committed outbox rows to a broker and marks them once it confirms.

    Run several relays at once for throughput and availability: they share the outbox's
    partitions through leases, and each key's messages keep their order.
    """

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        *,
        metrics: RelayMetrics | None = None,
    ) -> None:
        unwired = getattr(publisher, "cloudevents", 0) is None  # a publisher that could, unasked
        if unwired and settings.cloudevents_policy() is not None:
            raise ConfigurationError(
                "cloudevents is on (POSTROOM_CLOUDEVENTS) but the relay's publisher was built "
                "without it: pass cloudevents=settings.cloudevents_policy() to "
                "publisher_from_url, or turn the setting off"
            )
        self.settings = settings
        self.publisher = publisher
        self.relay_id = settings.relay_id or default_relay_id()
        self.metrics = metrics or RelayMetrics()
        self._tables = tables_for(settings)
        conninfo = psycopg_conninfo(settings.database_url)
        self._work_connection = Connection(conninfo, settings.database_url)
        self._lease_connection = Connection(conninfo, settings.database_url)
        self._housekeeping_connection = Connection(conninfo, settings.database_url)
        self._mark_connection = Connection(
            conninfo, settings.database_url, session=MARK_SESSION_SETTINGS
        )
        self._store = OutboxStore(self._work_connection, self._tables)
        self._marks = OutboxStore(self._mark_connection, self._tables)
        self._maintenance = OutboxStore(self._housekeeping_connection, self._tables)
        self.leases = PartitionLeases(
            self._lease_connection, self._tables, self.relay_id, settings.relay_lease
        )
        self.wakeup = Wakeup(conninfo, self._tables.notify_channel)
        self._row_backoff = Backoff(settings.relay_backoff_initial, settings.relay_backoff_max)
        self._lifecycle = Lifecycle(
            "relay",
            self.metrics.registry,
            metrics_port=settings.metrics_port_for("relay"),
            metrics_host=settings.metrics_host,
            health_timeout=max(settings.health_timeout, 4 * settings.relay_lease),
            healthy=self.healthy,
            ready=lambda: self.ready,
            identity={"relay": self.relay_id},
            on_stop=self.wakeup.set,
        )
        self._batches = Batches()
        self._recording: asyncio.Task[None] | None = None
        self._prefetch: asyncio.Task[tuple[Claim, frozenset[int]]] | None = None
        self._purge_due = Every(PURGE_INTERVAL)
        self._broker_ready = False
        self._broker_state: tuple[str, str | None] = (BROKER_CONNECTING, None)
        self.leases.broker_state = lambda: self._broker_state
        self._database_ready = False
        self._hygiene_failing = False

    def stop(self) -> None:
        """Ask the relay to finish the batch in flight, release its partitions and return."""
        self._lifecycle.stop()

    @property
    def ready(self) -> bool:
        """True while the database and broker answer and leases are current."""
        return self._database_ready and self._broker_ready and self.leases.seconds_left() > 0

    def healthy(self) -> bool:
        """False when the work loop is stuck, or heartbeats have failed for several leases."""
        patience = self._lifecycle.health_timeout
        if not self._lifecycle.turning():
            return False
        return time.monotonic() - max(self.leases.last_renewed, self._lifecycle.created) < patience

    async def run(self) -> None:
        """Run until :meth:`stop` is called (or the task is cancelled).

        Raises :class:`~postroom.errors.BrokerRefusedError` after a clean shutdown (partitions
        released, relay unregistered) when the broker refuses the relay's credentials or
        permissions: retrying with the same settings cannot help.
        """
        await self._lifecycle.run(
            self._work,
            background=[
                ("postroom-relay-heartbeat", self._heartbeats),
                ("postroom-relay-wakeup", self.wakeup.run),
                ("postroom-relay-housekeeping", self._housekeeping),
            ],
            drain=self._settle,
            close=self._shutdown,
            starting={
                "table": self._tables.outbox.fullname,
                "batch_size": self.settings.relay_batch_size,
                "lease": self.settings.relay_lease,
            },
        )

    async def _settle(self) -> None:
        """On the way out: forget the batch read ahead, and record the last batch
        (bounded) before the leases are released."""
        await self._drop_prefetch()
        task, self._recording = self._recording, None
        if task is None:
            return
        try:
            async with asyncio.timeout(self.settings.relay_lease / 2):
                await asyncio.shield(task)
        except (TimeoutError, DatabaseError, asyncio.CancelledError) as exc:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            log.warning(
                "relay.last_batch_unrecorded",
                error=str(exc) or type(exc).__name__,
                consequence="its rows stay pending and will be published again",
            )

    async def _shutdown(self) -> None:
        try:
            # The connection may have been cut under the relay: a retry gets a fresh one.
            await _with_retries(self.leases.release_all)
        except DatabaseError as exc:
            log.warning("relay.release_failed", error=str(exc))
        with contextlib.suppress(Exception):
            await self.publisher.close()
        await self._work_connection.close()
        await self._mark_connection.close()
        await self._lease_connection.close()
        await self._housekeeping_connection.close()

    async def _work(self) -> None:
        broker_failures = 0
        database_failures = 0
        reconnect = Backoff(initial=0.5, maximum=30.0)
        while not self._lifecycle.stopping.is_set():
            self._lifecycle.progressed()
            if not self._broker_ready:
                try:
                    await self.publisher.connect()
                except BrokerRefusedError as exc:
                    self._refused(exc)
                    return
                except BrokerUnavailableError as exc:
                    self._set_broker_ready(False, str(exc))
                    broker_failures += 1
                    delay = reconnect.delay(broker_failures)
                    log.warning(
                        "relay.broker_unavailable", error=str(exc), retry_in=round(delay, 2)
                    )
                    await self._pause(delay)
                    continue
                self._set_broker_ready(True)
                if broker_failures:
                    log.info("relay.broker_reconnected", after_failures=broker_failures)
                broker_failures = 0
            if not self.leases.owned or self.leases.seconds_left() <= self._min_lease():
                await self._pause(min(self.settings.relay_poll_interval, 0.25))
                continue
            try:
                claimed = await self._run_batch()
                if not claimed or not self._broker_ready:
                    await self._drop_prefetch()
                    await self._finish_recording()
            except DatabaseError as exc:
                self._database_ready = False
                database_failures += 1
                delay = reconnect.delay(database_failures)
                log.warning("relay.database_error", error=str(exc), retry_in=round(delay, 2))
                await self._pause(delay)
                continue
            self._database_ready = True
            database_failures = 0
            if not claimed:
                await self._pause(self.settings.relay_poll_interval, wake_on_notify=True)
            elif not self._broker_ready:
                broker_failures += 1
                await self._pause(reconnect.delay(broker_failures))

    def _min_lease(self) -> float:
        return self.settings.relay_lease / 4

    async def _pause(self, seconds: float, *, wake_on_notify: bool = False) -> None:
        if wake_on_notify:
            await self.wakeup.wait(seconds)
        else:
            await self._lifecycle.pause(seconds)

    async def _run_batch(self) -> bool:
        """Publish one batch and start recording its outcomes; False if nothing was due.

        Under a backlog (a full batch) three batches overlap: while one is published, the
        next is read and the previous one's outcomes are recorded; otherwise the next batch
        is read after the publish. Until a batch's outcomes are committed, its rows are
        left out of claims, and a claim read before then holds back the rows that come
        after a row that failed in it, key by key (kept in memory per batch), so the
        overlap never reorders a key.
        """
        started = time.monotonic()
        prefetch, self._prefetch = self._prefetch, None
        claim, unrecorded = await prefetch if prefetch is not None else await self._claim()
        claim = self._still_owned_rows(claim)
        if not claim.rows:
            return False
        number = self._batches.claimed(claim)
        if len(claim.rows) >= self.settings.relay_batch_size:
            # A full batch means a backlog: read the next batch while this one is published.
            # Otherwise the next claim waits for the publish, so it also takes the rows
            # committed meanwhile instead of leaving them for one batch later.
            self._prefetch = asyncio.create_task(self._claim())
        confirmed_at = [0.0] * len(claim.rows)
        results = await publish_in_key_order(
            self.publisher,
            [row.message for row in claim.rows],
            may_continue=lambda: self._still_owns(claim),
            stalled_keys=self._batches.stalled_keys(unrecorded),
            positions=[row.position for row in claim.rows],
            confirmed_at=confirmed_at,
        )
        observe_stages(self.metrics, claim, results, confirmed_at)
        self._batches.published(number, _first_unconfirmed(claim.rows, results))
        unavailable = [r for r in results if r is not None and r.outcome is Outcome.UNAVAILABLE]
        if unavailable:
            self._set_broker_ready(False, unavailable[0].error)
        try:
            await self._finish_recording()
        finally:
            # Even when the previous batch could not be recorded, this one must be, or
            # its rows would stay in flight (never claimed again) for the relay's life.
            self._recording = asyncio.create_task(self._record(claim, results, started, number))
        return True

    async def _claim(self) -> tuple[Claim, frozenset[int]]:
        """Read the next batch, with the batches not yet recorded when it was read."""
        unrecorded = self._batches.unrecorded()
        claim = await self._store.claim(
            self.leases.claimable(),
            limit=self.settings.relay_batch_size,
            in_flight=self._batches.positions(),
            max_bytes=self.settings.relay_batch_bytes,
        )
        return claim, unrecorded

    async def _drop_prefetch(self) -> None:
        """Forget a batch read ahead (a claim writes nothing, so there is nothing to undo)."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, DatabaseError):
                await task

    def _still_owned_rows(self, claim: Claim) -> Claim:
        """The claim without rows of partitions whose lease changed since it was read."""
        current = self.leases.tokens
        if all(current.get(p) == token for p, token in claim.tokens.items()):
            return claim
        tokens = {p: t for p, t in claim.tokens.items() if current.get(p) == t}
        rows = [r for r in claim.rows if r.partition in tokens]
        return Claim(rows, tokens, claim.claimed_at)

    def _still_owns(self, claim: Claim) -> bool:
        """True while every partition of the claim is held under the same lease token."""
        if self.leases.seconds_left() <= self._min_lease() / 2:
            return False
        current = self.leases.tokens
        return all(current.get(p) == token for p, token in claim.tokens.items())

    def _busy_partitions(self) -> frozenset[int]:
        """Partitions the heartbeat must not give up: those with rows in flight."""
        return self._batches.partitions()

    async def _finish_recording(self) -> None:
        """Wait for the batch being recorded; its database errors surface here."""
        task, self._recording = self._recording, None
        if task is not None:
            await task

    async def _record(
        self, claim: Claim, results: list[PublishResult | None], started: float, number: int
    ) -> None:
        rows = claim.rows
        try:
            batch = self._outcomes(claim, results)
            marked = await _with_retries(
                lambda: self._marks.mark(
                    batch,
                    max_attempts=self.settings.relay_max_attempts,
                    delete_published=self.settings.relay_retention == 0,
                )
            )
        finally:
            self._batches.recorded(number)
        self._count(rows, batch, marked)
        self.metrics.batch_seconds.observe(time.monotonic() - started)

    def _outcomes(self, claim: Claim, results: list[PublishResult | None]) -> BatchOutcomes:
        """What to record for each row of ``claim``, column by column."""
        rows = claim.rows
        numbers = {partition: n for n, partition in enumerate(claim.tokens, start=1)}
        names: list[str] = []
        failures: dict[int, tuple[str | None, float]] = {}
        for row, result in zip(rows, results, strict=True):
            if result is not None and result.outcome is Outcome.CONFIRMED:
                names.append(CONFIRMED)
                continue
            name, error, delay = self._outcome(row, result)
            names.append(name)
            if error is not None or delay:
                failures[row.position] = (error, delay)
        return BatchOutcomes(
            positions=[row.position for row in rows],
            attempts=[row.attempts for row in rows],
            due=[row.due_at for row in rows],
            outcomes=names,
            token_numbers=[numbers[row.partition] for row in rows],
            tokens=list(claim.tokens.values()),
            failures=failures,
        )

    def _outcome(
        self, row: ClaimedRow, result: PublishResult | None
    ) -> tuple[str, str | None, float]:
        """Outcome name, error and backoff delay for ``row`` given a broker's answer other
        than a confirm (None: held back, not sent)."""
        if result is None:
            return HELD, None, 0.0
        if result.outcome is Outcome.UNAVAILABLE:
            return UNAVAILABLE, f"broker unavailable: {result.error}", 0.0
        log.warning(
            "relay.publish_failed",
            message_id=str(row.message.id),
            topic=row.message.topic,
            key=row.message.key,
            attempt=row.attempts + 1,
            max_attempts=self.settings.relay_max_attempts,
            error=result.error,
            permanent=result.permanent,
        )
        if result.permanent:
            return REFUSED, result.error or "rejected for good", 0.0
        return REJECTED, result.error or "rejected", self._row_backoff.delay(row.attempts + 1)

    def _count(self, rows: list[ClaimedRow], batch: BatchOutcomes, marked: list[MarkedRow]) -> None:
        """Metrics and log events for one recorded batch: counters once per batch, the
        latencies of the published messages in one call."""
        by_position = {row.position: row for row in rows}
        outcome_of = dict(zip(batch.positions, batch.outcomes, strict=True))
        now = time.time()
        latencies: list[float] = []
        tally: collections.Counter[str] = collections.Counter()
        for mark in marked:
            row = by_position[mark.position]
            if mark.status == PUBLISHED:
                latencies.append(now - row.message.created_at.timestamp())
                continue
            tally[outcome_of[mark.position]] += 1
            if mark.status == DEAD:
                log.error(
                    "relay.dead_lettered",
                    message_id=str(row.message.id),
                    topic=row.message.topic,
                    key=row.message.key,
                    attempts=mark.attempts,
                    error=batch.failures.get(mark.position, (None, 0.0))[0],
                )
                tally["dead"] += 1
        if latencies:
            self.metrics.latency.observe_many(latencies)
        published = len(latencies)
        fenced = len(rows) - len(marked)
        for metric, count in (
            (self.metrics.published, published),
            (self.metrics.failed, tally[REJECTED] + tally[REFUSED]),
            (self.metrics.unavailable, tally[UNAVAILABLE]),
            (self.metrics.dead_lettered, tally["dead"]),
            (self.metrics.fenced, fenced),
        ):
            if count:
                metric.inc(count)
        if fenced:
            log.warning(
                "relay.mark_fenced",
                relay=self.relay_id,
                rows=fenced,
                reason="another relay re-claimed them after this relay's lease ran out",
            )

    def _set_broker_ready(self, ready: bool, error: str | None = None) -> None:
        self._broker_ready = ready
        self.metrics.broker_connected.set(1 if ready else 0)
        if ready:
            self._broker_state = (BROKER_CONNECTED, None)
        else:
            self._broker_state = (
                BROKER_UNAVAILABLE,
                redact_text(error or "unavailable")[:MAX_BROKER_ERROR_CHARS],
            )

    def _refused(self, exc: BrokerRefusedError) -> None:
        """The broker refuses this relay's credentials or permissions: not an outage.

        Holding partitions would stall their rows while healthy relays stand by, so the
        relay stops; its shutdown releases the partitions and leaves the live set, and
        :meth:`run` raises ``exc`` (the CLI prints it and exits with status 3).
        """
        log.error(
            "relay.broker_refused",
            relay=self.relay_id,
            error=str(exc),
            action="releasing partitions and exiting; retrying cannot help",
        )
        self._lifecycle.failure = exc
        self._lifecycle.stop()

    async def _heartbeats(self) -> None:
        interval = self.settings.relay_lease / 3
        while True:
            try:
                before = self.leases.owned
                await self.leases.heartbeat(self._busy_partitions)
                if self.leases.owned != before:
                    log.info(
                        "relay.partitions_changed",
                        relay=self.relay_id,
                        owned=len(self.leases.owned),
                        gained=len(self.leases.owned - before),
                        lost=len(before - self.leases.owned),
                        live_relays=self.leases.live_relays,
                    )
                    self.wakeup.set()
                self.metrics.owned_partitions.set(len(self.leases.owned))
                await asyncio.sleep(interval)
            except Exception as exc:  # the heartbeat must outlive any error
                log.warning("relay.heartbeat_failed", error=str(exc), kind=type(exc).__name__)
                await asyncio.sleep(min(interval, 1.0))

    async def _housekeeping(self) -> None:
        """Refresh the backlog gauges and purge published rows past their retention."""
        await repeat(self._housekeeping_round, HOUSEKEEPING_INTERVAL, on_error=_housekeeping_failed)

    async def _housekeeping_round(self) -> None:
        pending, oldest, dead = await self._maintenance.backlog()
        self.metrics.backlog.set(pending)
        self.metrics.oldest_pending_age.set(oldest)
        self.metrics.dead_rows.set(dead)
        await self._sample_hygiene()
        retention = self.settings.relay_retention
        if retention > 0 and self._purge_due.due():
            purged = await purge_round(
                lambda limit: self._maintenance.purge_published(retention, limit=limit)
            )
            if purged:
                log.info("relay.purged", rows=purged, older_than_seconds=retention)

    async def _sample_hygiene(self) -> None:
        """Refresh the dead-tuple and vacuum-horizon gauges. A failure is logged once (until
        a sample works again) and never holds back the purge or the relay."""
        try:
            dead_tuples, oldest = await self._maintenance.hygiene()
        except Exception as exc:  # a statistics view must never stop the relay
            if not self._hygiene_failing:
                self._hygiene_failing = True
                log.warning(
                    "relay.hygiene_sample_failed",
                    error=str(exc),
                    kind=type(exc).__name__,
                    advice="postroom_outbox_dead_tuples and "
                    "postroom_database_oldest_transaction_age_seconds keep their last value",
                )
            return
        self._hygiene_failing = False
        self.metrics.dead_tuples.set(dead_tuples)
        self.metrics.oldest_transaction_age.set(oldest)


def _first_unconfirmed(
    rows: list[ClaimedRow], results: list[PublishResult | None]
) -> dict[str, int]:
    """Key → position of its first row (rows are in position order) not confirmed."""
    first: dict[str, int] = {}
    for row, result in zip(rows, results, strict=True):
        key = row.message.key
        if key is not None and (result is None or not result.confirmed):
            first.setdefault(key, row.position)
    return first


def _housekeeping_failed(exc: Exception) -> None:
    log.warning("relay.housekeeping_failed", error=str(exc), kind=type(exc).__name__)


T = TypeVar("T")


async def _with_retries(action: Callable[[], Awaitable[T]]) -> T:
    """Run a database action, retrying for about two seconds: the broker already confirmed
    these rows, and a lost mark means publishing them again."""
    attempts = 5
    for attempt in range(1, attempts + 1):
        try:
            return await action()
        except DatabaseError:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")
