"""The Consumer: a named set of handlers, one per topic, registered with a decorator.

A topic has one handler: either a per-message one (:meth:`Consumer.handler`) or a batch
handler (:meth:`Consumer.batch_handler`) that receives the messages of a batch as a list.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from postroom.brokers.base import Subscriber
from postroom.config import Settings
from postroom.consumer.decoding import MAX_NAME_CHARS
from postroom.errors import HandlerRegistrationError
from postroom.message import TOPIC_PATTERN, Message, validate_topic
from postroom.outbox import Outbox

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class HandlerSpec:
    """One registered handler: the function, whether it is async, and its payload model."""

    topic: str
    function: Callable[..., Any]
    is_async: bool
    model: Any = None
    batch: bool = False
    """True for a batch handler: it is called with a list of messages (or models)."""

    @property
    def name(self) -> str:
        """The function's qualified name, for logs."""
        return getattr(self.function, "__qualname__", repr(self.function))


class Consumer:
    """A named consumer: handlers per topic, each run once per message in a transaction.

    The name namespaces the inbox rows, the RabbitMQ queues (``<name>``, ``<name>.retry.*``,
    ``<name>.dead-letter``) and the Kafka consumer group and dead-letter topic. Register
    handlers with :meth:`handler`; run the consumer with ``postroom consume module:attr``.
    """

    def __init__(self, name: str, settings: Settings | None = None) -> None:
        if not isinstance(name, str) or not TOPIC_PATTERN.fullmatch(name) or name in {".", ".."}:
            raise HandlerRegistrationError(
                f"consumer name {name!r} may only contain letters, digits, '.', '_' and '-' "
                "(it names queues and topics); e.g. 'billing'"
            )
        if len(name) > MAX_NAME_CHARS:
            raise HandlerRegistrationError(
                f"consumer name is {len(name)} characters long; keep it under {MAX_NAME_CHARS}"
            )
        self.name = name
        """The consumer's name (inbox namespace, queue name, Kafka group id)."""
        self._settings = settings
        self._handlers: dict[str, HandlerSpec] = {}

    def __repr__(self) -> str:
        return f"Consumer({self.name!r}, topics={self.topics!r})"

    @property
    def settings(self) -> Settings:
        """The settings given, else those of the ``POSTROOM_*`` environment (read once)."""
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def configure(self, settings: Settings) -> None:
        """Replace the consumer's settings (``postroom consume`` applies its options so)."""
        self._settings = settings

    @property
    def outbox(self) -> Outbox:
        """An Outbox on this consumer's tables: enqueue follow-up messages in a handler with
        ``await consumer.outbox.enqueue_async(session, topic, payload)`` (or ``enqueue`` in a
        sync handler), so they commit, or vanish, with the handler's transaction."""
        return Outbox.from_settings(self.settings)

    @property
    def topics(self) -> list[str]:
        """The topics that have a handler, in registration order."""
        return list(self._handlers)

    def handler_for(self, topic: str) -> HandlerSpec | None:
        """The handler registered for ``topic``, if any."""
        return self._handlers.get(topic)

    def handler(self, topic: str, *, model: Any = None) -> Callable[[F], F]:
        """Register the decorated function as the handler of ``topic``.

        ``async def h(message, session: AsyncSession)`` runs on the event loop;
        ``def h(message, session: Session)`` runs in a worker thread. Its writes, the inbox
        row and any messages it enqueues into ``session`` commit together, after it returns;
        an exception rolls all of them back and the message is retried. There is no need to
        commit the session yourself: the transaction belongs to postroom, and ``session``
        joins it with ``join_transaction_mode="create_savepoint"``, so a ``commit()`` in the
        handler (or in a library it calls) only releases a savepoint and a ``rollback()``
        only undoes the handler's writes since the last one. Nothing is durable until the
        handler returns; if it raises after committing, that work is rolled back too.
        Messages that arrive together may share one transaction (``consumer_batch_size``):
        each ``async def`` handler then runs under its own savepoint, and its writes commit
        with those of the others in its batch. To receive them as one list (bulk inserts),
        register a :meth:`batch_handler` instead.

        With ``model`` (or a first parameter annotated with a class that has
        ``model_validate``, such as a pydantic model), the handler receives the payload
        converted to it instead of the :class:`~postroom.Message`.
        """
        validate_topic(topic)

        def register(function: F) -> F:
            self._check_free(topic, function, batch=False)
            self._handlers[topic] = HandlerSpec(
                topic=topic,
                function=function,
                is_async=inspect.iscoroutinefunction(function),
                model=model if model is not None else _declared_model(function),
            )
            return function

        return register

    def batch_handler(self, topic: str, *, model: Any = None) -> Callable[[F], F]:
        """Register the decorated ``async def h(messages, session: AsyncSession)`` as the
        batch handler of ``topic``: it receives a list of messages at once (for bulk inserts).

        The list holds the messages of ``topic`` in the current batch (see
        ``consumer_batch_size``) that are not duplicates, in delivery order; the call runs
        in the batch's transaction, so its writes commit with the inbox rows of all of
        them, or none. With batch size 1, and for messages handled alone (a redelivery, a
        retry), it is called with a list of one.

        If it raises, the whole batch is rolled back and nothing of it is acknowledged;
        each of its messages is then handled alone (a list of one), in order (on Kafka in
        partition order): those that succeed are committed and acknowledged, one that
        fails alone takes the retry path as any message does (attempts counted, backoff,
        dead letter after
        ``consumer_max_attempts``). The failed batch call counts as no one's attempt.

        With ``model`` (or a first parameter annotated ``list[Model]``, for a class with
        ``model_validate``), it receives the payloads converted to it. A topic has either a
        handler or a batch handler; ``def`` functions are refused (a batch runs on the
        event loop, in one async transaction).
        """
        validate_topic(topic)

        def register(function: F) -> F:
            self._check_free(topic, function, batch=True)
            if not inspect.iscoroutinefunction(function):
                raise HandlerRegistrationError(
                    f"the batch handler of {topic!r} must be an 'async def' function taking "
                    "(messages, session: AsyncSession); for a 'def' function use "
                    "@consumer.handler, which runs it in a worker thread per message"
                )
            self._handlers[topic] = HandlerSpec(
                topic=topic,
                function=function,
                is_async=True,
                model=model if model is not None else _declared_model(function, batch=True),
                batch=True,
            )
            return function

        return register

    def _check_free(self, topic: str, function: Any, *, batch: bool) -> None:
        existing = self._handlers.get(topic)
        if existing is not None:
            kind = "a batch handler" if existing.batch else "a handler"
            raise HandlerRegistrationError(
                f"topic {topic!r} already has {kind} in consumer {self.name!r} "
                f"({existing.name}); a topic has one handler or one batch handler per "
                "consumer: remove one, or use a second Consumer with another name"
            )
        if not callable(function):
            what = "batch handler" if batch else "handler"
            raise HandlerRegistrationError(f"the {what} of {topic!r} is not callable")

    async def run(
        self, subscriber: Subscriber | None = None, *, broker_url: str | None = None
    ) -> None:
        """Run until cancelled: receive from ``subscriber`` (or one for ``broker_url``, by
        default the settings' broker) and handle every message once."""
        from postroom.brokers import subscriber_from_url
        from postroom.consumer.runner import ConsumerService

        if subscriber is None:
            subscriber = subscriber_from_url(
                broker_url or self.settings.broker_url, prefetch=self.settings.consumer_prefetch
            )
        await ConsumerService(self, subscriber, self.settings).run()


def _declared_model(function: Callable[..., Any], *, batch: bool = False) -> Any:
    """The model class the first parameter is annotated with (``list[Model]`` for a batch
    handler), or None."""
    try:
        hints = typing.get_type_hints(function)
        first = next(iter(inspect.signature(function).parameters), None)
    except (NameError, TypeError, ValueError):
        return None
    if first is None:
        return None
    hint = hints.get(first)
    if batch:
        if typing.get_origin(hint) not in _LISTS or len(typing.get_args(hint)) != 1:
            return None
        hint = typing.get_args(hint)[0]
    if (
        isinstance(hint, type)
        and hint is not Message
        and callable(getattr(hint, "model_validate", None))
    ):
        return hint
    return None


_LISTS = (list, collections.abc.Sequence, collections.abc.Iterable)

Handler = Callable[[Message, Any], Awaitable[None] | None]
