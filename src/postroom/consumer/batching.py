"""Deliveries handled together: one transaction, one inbox statement, a savepoint a handler.

Deliveries that arrive together (up to ``consumer_batch_size``, waiting at most
``consumer_batch_linger`` for more) are handled in one database transaction: one statement
records all their ids in the inbox, each handler runs under a savepoint of its own (its
session's, as on the one-message path), one commit makes them durable together, and only
then are they acknowledged (on Kafka with one offset commit for a partition's batch). A
handler that raises is rolled back to its savepoint, its inbox row is deleted before the
commit, and it takes the retry path once the others are committed; on a lane (a Kafka
partition) the batch stops there, and the deliveries after it are handled one by one after
it, in order.

A topic's batch handler (``@consumer.batch_handler``) is called once per batch with all of
the batch's new messages of its topic, in delivery order, under one savepoint. If it
raises, the savepoint and those messages' inbox rows are rolled back, the others of the
batch commit, and each of its messages is left to the per-message path (a list of one),
in order: the failed call is counted as an attempt of none of them, so one poison message
never takes the good ones of its batch to the dead letters with it.

What a batch cannot decide is left to the per-message path, with nothing of it committed:
a redelivery (it may be the one that killed the last process, see ``isolation``), a message
without a handler or with an id or payload that does not decode, a ``def`` handler (it runs
in a worker thread), a second copy of an id in the same batch, a handler that committed its
session and then failed, and any failure of the database or of the batch's own statements,
the commit included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from postroom import tracing
from postroom.brokers.base import HEADER_FOR_CONSUMER, AcknowledgedByLater, Delivery
from postroom.consumer.decoding import describe_error, to_message, to_model
from postroom.consumer.processing import (
    JOINED,
    Disposition,
    Result,
    being_cancelled,
    connection_failed,
    handler_cancelled,
    handler_context,
    log,
    raise_if_aborted,
)
from postroom.message import message_size
from postroom.schema.inbox_sql import delete_inbox_sql, insert_inbox_batch_sql
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


_COMMITTED = "postroom_committed"


class _CommitNoting(Session):
    """A handler's session in a batch, noting in its ``info`` that it was committed."""

    def commit(self) -> None:
        """Release the handler's savepoint (see :class:`Processor`), noted."""
        self.info[_COMMITTED] = True
        super().commit()


@dataclass
class _Outcome:
    """What the committed batch did: dispositions of settled items, and failed ones."""

    done: list[tuple[_Item, Disposition]]
    failed: list[tuple[_Item, Exception]]


class BatchProcessor:
    """Handles a batch of deliveries in one transaction, through a :class:`Processor`."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        tables = tables_for(processor.settings)
        self._insert = text(insert_inbox_batch_sql(tables))
        self._delete = text(delete_inbox_sql(tables))

    async def process(self, deliveries: Sequence[Delivery]) -> list[Result | None]:
        """Handle the longest leading run of ``deliveries`` the batch can take, commit,
        acknowledge; settle failed ones by the retry policy. One result per delivery, in
        order; ``None`` for each the caller must handle alone, in order (with
        :meth:`Processor.process`), after this returns."""
        results: list[Result | None] = [None] * len(deliveries)
        items = self._leading(deliveries)
        if not items:
            return results
        ordered = deliveries[0].lane is not None
        started = time.perf_counter()
        try:
            outcome = await self._run(items, ordered=ordered)
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
        outcome.done.sort(key=lambda done: index[id(done[0].delivery)])
        await self._settle_done(outcome.done, seconds, results, index)
        for item, exc in outcome.failed:
            results[index[id(item.delivery)]] = await self._settle_failed(item, exc)
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

    async def _run(self, items: list[_Item], *, ordered: bool) -> _Outcome:
        processor = self.processor
        consumer = processor.consumer.name
        outcome = _Outcome([], [])
        async with processor.gate.shared(), processor.handler_run() as handler_started:
            try:
                async with (
                    processor.async_engine.connect() as connection,
                    contextlib.AsyncExitStack() as sessions,
                ):
                    await connection.begin()
                    try:
                        ids = [item.message_id for item in items]
                        inserted = await connection.execute(
                            self._insert, {"consumer": consumer, "message_ids": ids}
                        )
                        new = set(inserted.scalars())
                        called: set[str] = set()  # topics whose batch handler ran
                        for number, item in enumerate(items):
                            if item.message_id not in new:
                                outcome.done.append((item, Disposition.DUPLICATE))
                                continue
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
                                failure = await self._handle(connection, sessions, group)
                                if failure is None:
                                    outcome.done.extend((i, Disposition.HANDLED) for i in group)
                                    continue
                                self._left_alone(group, failure)
                                if ordered:
                                    break
                                continue
                            handler_started()
                            failure = await self._handle(connection, sessions, [item])
                            if failure is None:
                                outcome.done.append((item, Disposition.HANDLED))
                                continue
                            outcome.failed.append((item, failure))
                            if ordered:
                                break
                        handled = {
                            i.message_id for i, d in outcome.done if d is Disposition.HANDLED
                        }
                        unhandled = [i for i in new if i not in handled]
                        if unhandled:  # failed, or not run (after a failure on a lane)
                            params = {"consumer": consumer, "message_ids": unhandled}
                            await connection.execute(self._delete, params)
                        await connection.commit()
                    except BaseException:
                        await _rollback_quietly(connection)
                        raise
            except (sa_exc.SQLAlchemyError, OSError) as exc:
                raise _LeftToSingles(describe_error(exc)) from exc
        return outcome

    def _left_alone(self, group: list[_Item], failure: Exception) -> None:
        """Log a batch handler's failed call; its messages are handled alone after the
        batch (their results stay None)."""
        item = group[0]
        log.warning(
            "consumer.batch_handler_failed",
            **self.processor.about(item.spec.topic),
            size=len(group),
            error=describe_error(failure),
            advice="each of its messages is handled alone now, then retried as usual",
        )

    async def _handle(
        self, connection: AsyncConnection, sessions: contextlib.AsyncExitStack, items: list[_Item]
    ) -> Exception | None:
        """Run one handler (a batch handler: with all of ``items``, else with the one
        item); its failure (rolled back), or None.

        The handler's session takes a savepoint at its first statement, as on the
        one-message path, and that is the handler's own savepoint in the batch: a failure
        rolls back to it. A handler that committed its session (which releases the
        savepoint) and then failed cannot be rolled back alone: the whole batch is then
        left to the one-message path. A session stays open until the batch's transaction
        ended: closing it would roll back to its savepoint, releasing would cost a round trip.
        """
        session = AsyncSession(bind=connection, sync_session_class=_CommitNoting, **JOINED)
        try:
            spec = items[0].spec
            argument = [i.argument for i in items] if spec.batch else items[0].argument
            with self._context(items):
                await spec.function(argument, session)
                await session.flush()
                await raise_if_aborted(connection)
        except BaseException as exc:
            committed = session.sync_session.info.get(_COMMITTED, False)
            with contextlib.suppress(Exception):  # a lost connection: the batch is over
                await session.close()  # rolls back to the handler's savepoint
            failure = _attempt_failure(exc)
            if committed:
                raise _LeftToSingles("a handler committed its session and then failed") from exc
            return failure
        sessions.push_async_callback(session.close)
        return None

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
        for item, disposition in done:
            delivery = item.delivery
            if isinstance(delivery, AcknowledgedByLater) and (
                last_of_lane[delivery.lane] is not delivery
            ):
                delivery.settle_for_later_ack()
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

    async def _settle_failed(self, item: _Item, exc: Exception) -> Result:
        """The retry policy for a handler that failed in the batch (after the commit)."""
        processor = self.processor
        attempt = max(1, item.delivery.attempt)
        result = await processor.failed(item.delivery, exc, attempt, item.message_id)
        if result is None:  # retried in place: its next attempts run alone
            result = await processor.process_from(item.delivery, attempt + 1)
        return result


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
