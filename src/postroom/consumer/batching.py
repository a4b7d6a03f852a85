"""Deliveries handled together: one transaction, one inbox statement, one commit.

Deliveries that arrive together (up to ``consumer_batch_size``, waiting at most
``consumer_batch_linger`` for more) are handled in one database transaction: one statement
records all their ids in the inbox, each handler runs in turn with a session of its own
joined to that transaction, one commit makes them durable together, and only then are they
acknowledged (on Kafka with one offset commit for a partition's batch).

Batches are optimistic: no handler gets a savepoint of its own. Per handler, a savepoint
costs a round trip and SQLAlchemy's nested-transaction machinery, which measured a quarter
of a batch's CPU time (the consumer is CPU-bound long before PostgreSQL is); handlers that
fail are rare. When one does fail (or rolls back its session, or swallows a database error
that aborted the transaction), the whole batch is rolled back, nothing of it acknowledged,
and each of its deliveries goes through the one-message path, in order: the failure there
is counted and retried as usual, and the others commit one by one. So a handler whose
neighbour failed runs twice, once rolled back: its database writes happen once, as they
would after any redelivery. The failed batch run counts as an attempt of none of them.

A topic's batch handler (``@consumer.batch_handler``) is called once per batch with all of
the batch's new messages of its topic, in delivery order; if the batch goes one by one,
it is called with lists of one.

What a batch cannot decide is also left to the per-message path, with nothing of it
committed: a redelivery (it may be the one that killed the last process, see
``isolation``), a message without a handler or with an id or payload that does not decode,
a ``def`` handler (it runs in a worker thread), a second copy of an id in the same batch,
and any failure of the database or of the batch's own statements, the commit included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, AsyncTransaction

from postroom import tracing
from postroom.brokers.base import HEADER_FOR_CONSUMER, AcknowledgedByLater, Delivery
from postroom.consumer.decoding import describe_error, to_message, to_model
from postroom.consumer.processing import (
    Disposition,
    Result,
    being_cancelled,
    handler_cancelled,
    handler_context,
    log,
)
from postroom.consumer.transactions import (
    JOINED_WITHOUT_SAVEPOINT,
    connection_failed,
    raise_if_aborted,
)
from postroom.errors import AbortedTransactionError
from postroom.message import message_size
from postroom.schema.inbox_sql import insert_inbox_batch_sql
from postroom.schema.tables import tables_for

if TYPE_CHECKING:
    from postroom.consumer.processing import Processor
    from postroom.consumer.registry import HandlerSpec


@dataclass(frozen=True, slots=True)
class _Item:
    """A delivery the batch can handle, decoded."""

    delivery: Delivery
    spec: HandlerSpec
    argument: Any
    message_id: str


class _LeftToSingles(Exception):
    """The batch cannot finish; nothing of it committed: each delivery goes on alone."""


class BatchProcessor:
    """Handles a batch of deliveries in one transaction, through a :class:`Processor`."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        tables = tables_for(processor.settings)
        self._insert = text(insert_inbox_batch_sql(tables))

    async def process(self, deliveries: Sequence[Delivery]) -> list[Result | None]:
        """Handle the longest leading run of ``deliveries`` the batch can take, commit,
        acknowledge; settle failed ones by the retry policy. One result per delivery, in
        order; ``None`` for each the caller must handle alone, in order (with
        :meth:`Processor.process`), after this returns."""
        results: list[Result | None] = [None] * len(deliveries)
        items = self._leading(deliveries)
        if not items:
            return results
        started = time.perf_counter()
        try:
            done = await self._run(items)
        except _LeftToSingles as left:
            log.info(
                "consumer.batch_left_to_singles",
                consumer=self.processor.consumer.name,
                size=len(items),
                reason=str(left),
            )
            return results
        seconds = time.perf_counter() - started
        index = {id(delivery): number for number, delivery in enumerate(deliveries)}
        # In delivery order (a batch handler's messages are done together): on a lane, the
        # last one acknowledged is then the latest.
        done.sort(key=lambda settled: index[id(settled[0].delivery)])
        await self._settle_done(done, seconds, results, index)
        return results

    def _leading(self, deliveries: Sequence[Delivery]) -> list[_Item]:
        """The decoded items of the leading deliveries the batch can handle."""
        items: list[_Item] = []
        seen: set[str] = set()
        for delivery in deliveries:
            item = self._item(delivery)
            if item is None or item.message_id in seen:
                break
            seen.add(item.message_id)
            items.append(item)
        return items

    def _item(self, delivery: Delivery) -> _Item | None:
        processor = self.processor
        if delivery.redelivered or HEADER_FOR_CONSUMER in delivery.headers:
            return None
        if message_size(delivery.body, delivery.headers) > processor.max_message_bytes:
            return None
        spec = processor.consumer.handler_for(delivery.topic)
        if spec is None or not spec.is_async:
            return None
        try:
            message_id = processor.id_source.read(delivery)
            message = to_message(delivery, message_id)
            argument = to_model(message, spec.model) if spec.model is not None else message
        except Exception:
            return None  # the per-message path dead-letters it or counts a failed attempt
        return _Item(delivery, spec, argument, message_id)

    async def _run(self, items: list[_Item]) -> list[tuple[_Item, Disposition]]:
        processor = self.processor
        consumer = processor.consumer.name
        done: list[tuple[_Item, Disposition]] = []
        async with processor.gate.shared(), processor.handler_run() as handler_started:
            try:
                async with processor.async_engine.connect() as connection:
                    transaction = await connection.begin()
                    try:
                        ids = [item.message_id for item in items]
                        inserted = await connection.execute(
                            self._insert, {"consumer": consumer, "message_ids": ids}
                        )
                        new = set(inserted.scalars())
                        called: set[str] = set()  # topics whose batch handler ran
                        for number, item in enumerate(items):
                            if item.message_id not in new:
                                done.append((item, Disposition.DUPLICATE))
                                continue
                            group = [item]
                            if item.spec.batch:
                                if item.spec.topic in called:
                                    continue
                                called.add(item.spec.topic)
                                group = [
                                    i
                                    for i in items[number:]
                                    if i.spec is item.spec and i.message_id in new
                                ]
                            handler_started()
                            await self._handle(connection, transaction, group)
                            done.extend((i, Disposition.HANDLED) for i in group)
                        await self._raise_if_aborted(connection)
                        await connection.commit()
                    except BaseException:
                        await _rollback_quietly(connection)
                        raise
            except (sa_exc.SQLAlchemyError, OSError) as exc:
                raise _LeftToSingles(describe_error(exc)) from exc
        return done

    async def _handle(
        self, connection: AsyncConnection, transaction: AsyncTransaction, items: list[_Item]
    ) -> None:
        """Run one handler (a batch handler: with all of ``items``, else with the one
        item) in the batch's transaction; :class:`_LeftToSingles` if it failed.

        The handler's session joins the transaction without a savepoint of its own (see
        the module's docstring): its ``commit()`` only flushes, and its ``rollback()``
        rolls back the whole batch, which then goes on one by one.
        """
        session = AsyncSession(bind=connection, **JOINED_WITHOUT_SAVEPOINT)
        try:
            spec = items[0].spec
            argument = [i.argument for i in items] if spec.batch else items[0].argument
            with self._context(items):
                await spec.function(argument, session)
                await session.flush()
            if not transaction.is_active:
                raise _LeftToSingles("a handler rolled back its session")
        except _LeftToSingles:
            raise
        except BaseException as exc:
            failure = _attempt_failure(exc)
            raise _LeftToSingles(f"a handler failed: {describe_error(failure)}") from exc
        finally:
            with contextlib.suppress(Exception):  # a lost connection: the batch is over
                await session.close()  # leaves the batch's transaction alone

    @staticmethod
    async def _raise_if_aborted(connection: AsyncConnection) -> None:
        """:class:`_LeftToSingles` if a handler swallowed a database error that aborted the
        batch's transaction (checked once, before the commit: a later handler's statement
        fails on an aborted transaction anyway, and each goes alone after)."""
        try:
            await raise_if_aborted(connection)
        except AbortedTransactionError as exc:
            raise _LeftToSingles(f"a handler failed: {exc}") from exc

    def _context(self, items: list[_Item]) -> contextlib.AbstractContextManager[None]:
        """What a handler runs in: for one message its span and correlation ids (see
        :func:`handler_context`); for several, one span linked to each of theirs, and no
        causation id (follow-ups have no single cause)."""
        consumer = self.processor.consumer.name
        first = items[0]
        if len(items) == 1:
            return handler_context(first.delivery, first.message_id, consumer)
        return tracing.processing_batch(
            [(i.delivery.headers, i.message_id) for i in items],
            first.spec.topic,
            consumer,
            tracing.messaging_system(first.delivery),
        )

    async def _settle_done(
        self,
        done: list[tuple[_Item, Disposition]],
        seconds: float,
        results: list[Result | None],
        index: dict[int, int],
    ) -> None:
        processor = self.processor
        metrics = processor.metrics
        last_of_lane = {item.delivery.lane: item.delivery for item, _ in done}
        # A runtime-checkable protocol's isinstance is slow: decided once per class.
        acknowledged_by_later: dict[type, bool] = {}
        for item, disposition in done:
            delivery = item.delivery
            kind = type(delivery)
            later = acknowledged_by_later.get(kind)
            if later is None:
                later = acknowledged_by_later[kind] = isinstance(delivery, AcknowledgedByLater)
            if later and last_of_lane[delivery.lane] is not delivery:
                cast(AcknowledgedByLater, delivery).settle_for_later_ack()
            else:
                await processor.acknowledge(delivery)
            label = processor.label(delivery.topic)
            if disposition is Disposition.DUPLICATE:
                metrics.duplicates.labels(label).inc()
                log.info(
                    "consumer.duplicate",
                    **processor.about(delivery.topic, message_id=item.message_id),
                )
            else:
                metrics.latency.labels(label).observe(seconds)
                metrics.handled.labels(label).inc()
            attempt = max(1, delivery.attempt)
            results[index[id(delivery)]] = Result(disposition, None, attempt, item.message_id)


def _attempt_failure(exc: BaseException) -> Exception:
    """``exc`` as the failure of a handler's attempt; re-raised if it ends the batch (the
    database was lost, or the consumer is stopping)."""
    if isinstance(exc, sa_exc.DBAPIError) and connection_failed(exc):
        raise exc
    if isinstance(exc, asyncio.CancelledError):
        if being_cancelled():
            raise exc
        failure = handler_cancelled()
        failure.__cause__ = exc
        return failure
    if not isinstance(exc, Exception):
        raise exc
    return exc


async def _rollback_quietly(connection: AsyncConnection) -> None:
    try:
        await connection.rollback()
    except Exception as exc:  # the connection is gone: the server rolled it back
        log.debug("consumer.batch_rollback_failed", error=describe_error(exc))
