"""OpenTelemetry tracing across the outbox (the optional extra ``postroom[otel]``).

The only module that imports OpenTelemetry. Without the extra, or while no tracer provider
is configured, every function here does nothing (or returns nothing) at near-zero cost.

- :func:`trace_headers`: at enqueue, the W3C ``traceparent``/``tracestate`` of the span
  active then, stored with the message (its headers) and carried to the broker.
- :func:`publish`: the relay publishes each message in a PRODUCER span ``<topic> publish``
  linked to the span context stored with it.
- :func:`processing`: the consumer runs a handler in a CONSUMER span ``<topic> process``
  whose parent is the context in the message's headers; follow-ups enqueued in the handler
  carry that span's ``traceparent``.
- :func:`processing_batch`: a batch handler called with several messages runs in one
  CONSUMER span ``<topic> process``, a new trace linked to each message's span context.

Attributes follow the OpenTelemetry messaging semantic conventions: span names as in
v1.24 (``<destination> <operation>``), and both ``messaging.operation`` (v1.24) and
``messaging.operation.type`` (v1.26) beside ``messaging.system``,
``messaging.destination.name`` and ``messaging.message.id``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from postroom.brokers.base import Publisher, PublishResult
from postroom.message import Message

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
#: Longest ``tracestate`` taken from a message (W3C: propagate at least 512 characters).
MAX_TRACESTATE_CHARS: Final = 512
#: Longest ``traceparent`` taken from a message (version 00 is 55 characters).
MAX_TRACEPARENT_CHARS: Final = 512
INSTRUMENTATION: Final = "postroom"

_provider: TracerProvider | None = None
_cached: tuple[object, Tracer] | None = None
"""The last provider asked and postroom's tracer from it."""
_propagator: Any = TraceContextTextMapPropagator() if trace is not None else None


def available() -> bool:
    """True when the OpenTelemetry API is installed (the ``otel`` extra)."""
    return trace is not None


def use_provider(provider: TracerProvider | None) -> None:
    """Make postroom's spans go to ``provider`` instead of the global tracer provider
    (``None``: back to the global one). For tests, and applications that keep several."""
    global _provider
    _provider = provider


def _tracer() -> Tracer | None:
    """postroom's tracer, or None when no tracer provider is configured (or it fails to
    give one: tracing never holds a message back)."""
    if trace is None:
        return None
    provider = _provider or trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    global _cached
    if _cached is None or _cached[0] is not provider:
        try:
            _cached = (provider, provider.get_tracer(INSTRUMENTATION))
        except Exception:
            return None
    return _cached[1]


def trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the span active now, if there is a valid one."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    try:
        _propagator.inject(carrier)
    except Exception:  # tracing is best effort: it never fails an enqueue
        return {}
    return carrier


def _extracted(headers: Mapping[str, str]) -> Any:
    """The OpenTelemetry context in ``headers`` (a fresh one when there is none, or it is
    malformed: headers come from any producer, and tracing never fails a message)."""
    carrier: dict[str, str] = {}
    parent = headers.get(TRACEPARENT)
    if isinstance(parent, str) and len(parent) <= MAX_TRACEPARENT_CHARS:
        carrier[TRACEPARENT] = parent
        state = headers.get(TRACESTATE)
        if isinstance(state, str) and len(state) <= MAX_TRACESTATE_CHARS:
            carrier[TRACESTATE] = state
    if not carrier:
        return otel_context.Context()
    try:
        return _propagator.extract(carrier, context=otel_context.Context())
    except Exception:
        return otel_context.Context()


def messaging_system(broker_object: object) -> str:
    """``messaging.system`` of a publisher or delivery: rabbitmq, kafka or memory."""
    module = type(broker_object).__module__
    for system in ("rabbitmq", "kafka", "memory"):
        if module.startswith(f"postroom.brokers.{system}"):
            return system
    return "postroom"


def _attributes(system: str, topic: str, message_id: str | None, operation: str) -> dict[str, Any]:
    """The messaging attributes of a span (``messaging.message.id`` unless None)."""
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.destination.name": topic,
        "messaging.operation": operation,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    return attributes


def _publish_spans(tracer: Tracer, system: str, batch: Sequence[Message]) -> list[Span]:
    spans: list[Span] = []
    for message in batch:
        origin = trace.get_current_span(_extracted(message.headers)).get_span_context()
        spans.append(
            tracer.start_span(
                f"{message.topic} publish",
                context=otel_context.Context(),
                kind=trace.SpanKind.PRODUCER,
                attributes=_attributes(system, message.topic, str(message.id), "publish"),
                links=[trace.Link(origin)] if origin.is_valid else None,
            )
        )
    return spans


async def publish(publisher: Publisher, batch: Sequence[Message]) -> list[PublishResult]:
    """``publisher.publish(batch)``, each message in a PRODUCER span ``<topic> publish``
    linked to the span context stored with it; a message not confirmed ends its span with
    an error status naming the outcome."""
    tracer = _tracer()
    if tracer is None:
        return await publisher.publish(batch)
    try:
        spans = _publish_spans(tracer, messaging_system(publisher), batch)
    except Exception:  # a tracing failure must never hold messages back
        return await publisher.publish(batch)
    try:
        results = await publisher.publish(batch)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            for span in spans:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                span.end()
        raise
    # The broker has answered: a tracing failure now must not lose what it confirmed.
    with contextlib.suppress(Exception):
        for span, result in zip(spans, results, strict=True):
            if not result.confirmed:
                span.set_attribute("error.type", result.outcome.value)
                span.set_status(trace.StatusCode.ERROR, result.error or result.outcome.value)
            span.end()
    return results


@contextlib.contextmanager
def _guarded(scope: contextlib.AbstractContextManager[Any]) -> Iterator[None]:
    """Run the block inside ``scope`` (a span); a failure of the scope itself, entering or
    leaving it, is dropped, the block's own exception is not: tracing never fails a
    message."""
    try:
        scope.__enter__()
        entered = True
    except Exception:
        entered = False
    if not entered:
        yield
        return
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            scope.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with contextlib.suppress(Exception):
        scope.__exit__(None, None, None)


@contextlib.contextmanager
def processing(
    headers: Mapping[str, str], topic: str, message_id: str, consumer: str, system: str
) -> Iterator[None]:
    """Run the block (a handler) in a CONSUMER span ``<topic> process``, current while it
    runs, whose parent is the span context in ``headers`` (a new trace when there is none
    or it is malformed). An exception escaping the block is recorded on the span."""
    tracer = _tracer()
    if tracer is None:
        yield
        return
    attributes = _attributes(system, topic, message_id, "process")
    attributes["messaging.consumer.group.name"] = consumer
    scope: contextlib.AbstractContextManager[Any]
    try:
        scope = tracer.start_as_current_span(
            f"{topic} process",
            context=_extracted(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
    except Exception:  # tracing never fails a message
        scope = contextlib.nullcontext()
    with _guarded(scope):
        yield


@contextlib.contextmanager
def processing_batch(
    messages: Sequence[tuple[Mapping[str, str], str]], topic: str, consumer: str, system: str
) -> Iterator[None]:
    """Run the block (a batch handler) in a CONSUMER span ``<topic> process``, current
    while it runs: a new trace, linked to the span context in each of ``messages``' headers
    (``(headers, message id)`` pairs), with ``messaging.batch.message_count``."""
    tracer = _tracer()
    if tracer is None:
        yield
        return
    try:
        links = []
        for headers, _ in messages:
            origin = trace.get_current_span(_extracted(headers)).get_span_context()
            if origin.is_valid:
                links.append(trace.Link(origin))
    except Exception:  # tracing never fails a message
        links = []
    attributes = _attributes(system, topic, None, "process")
    attributes["messaging.consumer.group.name"] = consumer
    attributes["messaging.batch.message_count"] = len(messages)
    scope: contextlib.AbstractContextManager[Any]
    try:
        scope = tracer.start_as_current_span(
            f"{topic} process",
            context=otel_context.Context(),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
    except Exception:  # tracing never fails a message
        scope = contextlib.nullcontext()
    with _guarded(scope):
        yield
