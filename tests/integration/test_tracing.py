"""OpenTelemetry tracing across the outbox, on real PostgreSQL, RabbitMQ and Kafka.

One trace from the span active at enqueue, through the relay's PRODUCER span (linked to
it) and the consumer's CONSUMER span (its child), to a follow-up enqueued in the handler
that carries the consumer span's traceparent and the correlation and causation ids. Spans
go to the SDK's in-memory exporter through a provider given to postroom for this module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, Tracer
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import postroom
from postroom import tracing
from postroom.brokers import publisher_from_url
from postroom.brokers.memory import MemoryBroker
from postroom.consumer import ConsumerService
from postroom.message import HEADER_CAUSATION_ID, HEADER_CORRELATION_ID, Message
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.schema import Tables
from tests.support.consuming import Rig, settings_for, unique
from tests.support.relaying import relay_settings, running_relay
from tests.support.services import AMQP_URL, KAFKA_URL, kafka_available, rabbitmq_available
from tests.support.waiting import wait_until

#: Follow-ups stay in the outbox (the relay would publish them to a topic no one binds).
LATER = 3600


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """Where the module's spans go."""
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """postroom's spans (and the tests' own) to the in-memory exporter, for this module
    only (the global tracer provider can be set once per process)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield provider
    tracing.use_provider(None)
    provider.shutdown()


@pytest.fixture
def spans(provider: TracerProvider, exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The exporter, emptied for this test."""
    exporter.clear()
    return exporter


@pytest.fixture
def tracer(provider: TracerProvider) -> Tracer:
    """A tracer of the tests' own, exporting to the same place as postroom's spans."""
    return provider.get_tracer("tests")


@pytest.fixture(params=["rabbitmq", "kafka"])
def rig(request: pytest.FixtureRequest) -> Rig:
    if request.param == "rabbitmq":
        rabbitmq_available()
    else:
        kafka_available()
    return Rig(request.param)


def rows(engine: Engine, tables: Tables, topic: str) -> list[Any]:
    with engine.connect() as connection:
        query = select(tables.outbox).where(tables.outbox.c.topic == topic)
        return list(connection.execute(query.order_by(tables.outbox.c.position)).all())


def headers_of(row: Any) -> dict[str, str]:
    value = row.headers
    return dict(json.loads(value) if isinstance(value, str) else value)


def named(exporter: InMemorySpanExporter, name: str) -> ReadableSpan | None:
    return next((s for s in exporter.get_finished_spans() if s.name == name), None)


def traceparent(span: SpanContext) -> str:
    """The W3C traceparent header of ``span``."""
    return f"00-{span.trace_id:032x}-{span.span_id:016x}-{span.trace_flags:02x}"


async def test_one_trace_from_enqueue_through_the_broker_to_a_follow_up(
    rig: Rig,
    database_url: str,
    tables: Tables,
    engine: Engine,
    outbox: Outbox,
    spans: InMemorySpanExporter,
    tracer: Tracer,
) -> None:
    name = unique("traced")
    (topic,) = await rig.topics("orders", consumer=name)
    follow_topic = unique("shipments")
    settings = settings_for(database_url, tables)
    consumer = postroom.Consumer(name, settings)

    @consumer.handler(topic)
    async def ship(message: postroom.Message, session: AsyncSession) -> None:
        await outbox.enqueue_async(session, follow_topic, {"for": str(message.id)}, delay=LATER)

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    publisher = publisher_from_url(AMQP_URL if rig.kind == "rabbitmq" else KAFKA_URL)
    relay = Relay(relay_settings(database_url, tables), publisher)
    async with rig.running(service, name):
        with tracer.start_as_current_span("checkout") as checkout, Session(engine) as session:
            written = outbox.enqueue(session, topic, {"order": 1}, key="order-1")
            session.commit()
        async with running_relay(relay):
            await wait_until(
                lambda: rows(engine, tables, follow_topic), within=20, what="the follow-up row"
            )
            await wait_until(lambda: named(spans, f"{topic} process"), what="the consumer span")

    origin = checkout.get_span_context()
    assert headers_of(rows(engine, tables, topic)[0])["traceparent"] == traceparent(origin)

    producer = named(spans, f"{topic} publish")
    assert producer is not None
    assert producer.kind is SpanKind.PRODUCER
    assert [link.context.span_id for link in producer.links] == [origin.span_id]
    assert producer.links[0].context.trace_id == origin.trace_id
    assert (
        dict(producer.attributes or {}).items()
        >= {
            "messaging.system": rig.kind,
            "messaging.destination.name": topic,
            "messaging.message.id": str(written.id),
            "messaging.operation.type": "publish",
        }.items()
    )

    process = named(spans, f"{topic} process")
    assert process is not None
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is not None
    assert process.parent.span_id == origin.span_id
    assert process.context is not None
    assert process.context.trace_id == origin.trace_id
    assert (
        dict(process.attributes or {}).items()
        >= {
            "messaging.system": rig.kind,
            "messaging.destination.name": topic,
            "messaging.message.id": str(written.id),
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": name,
        }.items()
    )

    (follow_up,) = rows(engine, tables, follow_topic)
    assert headers_of(follow_up) == {
        "traceparent": traceparent(process.context),
        HEADER_CORRELATION_ID: str(written.id),
        HEADER_CAUSATION_ID: str(written.id),
    }


async def test_a_malformed_traceparent_starts_a_fresh_trace_and_the_handler_runs(
    database_url: str,
    tables: Tables,
    engine: Engine,
    outbox: Outbox,
    spans: InMemorySpanExporter,
) -> None:
    """Hostile trace headers never fail a message; a sync handler's follow-ups get the
    context too, and a correlation id the consumed message carries is kept."""
    rabbitmq_available()
    rig = Rig("rabbitmq")
    name = unique("untraced")
    (topic,) = await rig.topics("orders", consumer=name)
    follow_topic = unique("shipments")
    settings = settings_for(database_url, tables)
    consumer = postroom.Consumer(name, settings)

    @consumer.handler(topic)
    def ship(message: postroom.Message, session: Session) -> None:
        outbox.enqueue(session, follow_topic, {"for": str(message.id)}, delay=LATER)

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    hostile = {"traceparent": "00-zz-not-a-trace-01", "tracestate": "\x01" * 600}
    message = Message.create(topic, {"order": 2}, headers={**hostile, HEADER_CORRELATION_ID: "c-7"})
    async with rig.running(service, name):
        await rig.publish([message])
        await wait_until(
            lambda: rows(engine, tables, follow_topic), within=10, what="the follow-up row"
        )
        await wait_until(lambda: named(spans, f"{topic} process"), what="the consumer span")

    process = named(spans, f"{topic} process")
    assert process is not None
    assert process.context is not None
    assert process.parent is None  # a new trace: nothing taken from the bad header
    (follow_up,) = rows(engine, tables, follow_topic)
    assert headers_of(follow_up) == {
        "traceparent": traceparent(process.context),
        HEADER_CORRELATION_ID: "c-7",
        HEADER_CAUSATION_ID: str(message.id),
    }


def test_enqueue_without_a_span_writes_no_trace_headers_and_keeps_the_users(
    engine: Engine, tables: Tables, outbox: Outbox, tracer: Tracer
) -> None:
    with Session(engine) as session:
        plain = outbox.enqueue(session, "plain", {"n": 1})
        with tracer.start_as_current_span("checkout"):
            own = outbox.enqueue(session, "own", {"n": 2}, headers={"traceparent": "mine"})
        session.commit()
    assert headers_of(rows(engine, tables, "plain")[0]) == {} == dict(plain.headers)
    assert headers_of(rows(engine, tables, "own")[0]) == {"traceparent": "mine"}
    assert dict(own.headers) == {"traceparent": "mine"}


def test_postroom_enqueues_without_opentelemetry_installed(
    database_url: str, tables: Tables, engine: Engine
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        from sqlalchemy.orm import Session
        from postroom import tracing
        from postroom.database import create_engine
        from postroom.outbox import Outbox
        from postroom.schema import build_tables
        assert not tracing.available()
        engine = create_engine({database_url!r})
        with Session(engine) as session:
            Outbox(build_tables({tables.schema!r})).enqueue(session, "bare", {{"n": 1}})
            session.commit()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert [headers_of(row) for row in rows(engine, tables, "bare")] == [{}]


async def test_a_failed_handler_run_is_recorded_on_its_span(
    database_url: str, tables: Tables, spans: InMemorySpanExporter
) -> None:
    rabbitmq_available()
    rig = Rig("rabbitmq")
    name = unique("failing")
    (topic,) = await rig.topics("orders", consumer=name)
    settings = settings_for(database_url, tables)
    consumer = postroom.Consumer(name, settings)
    runs: list[str] = []

    @consumer.handler(topic)
    async def flaky(message: postroom.Message, session: AsyncSession) -> None:
        runs.append(str(message.id))
        if len(runs) == 1:
            raise RuntimeError("card declined")

    service = ConsumerService(consumer, rig.subscriber(settings), settings)
    async with rig.running(service, name):
        await rig.publish([Message.create(topic, {"order": 3})])
        await wait_until(
            lambda: (
                len([s for s in spans.get_finished_spans() if s.name == f"{topic} process"]) == 2
            ),
            within=10,
            what="two consumer spans",
        )

    failed, succeeded = sorted(
        (s for s in spans.get_finished_spans() if s.name == f"{topic} process"),
        key=lambda s: s.start_time or 0,
    )
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in failed.events if e.attributes] == [
        "RuntimeError"
    ]
    assert succeeded.status.status_code is not StatusCode.ERROR
    assert len(runs) == 2


class _BrokenSpans:
    """A span scope whose entering (``at="start"``) or leaving (``at="end"``) raises."""

    def __init__(self, at: str) -> None:
        self.at = at

    def __enter__(self) -> None:
        if self.at == "start":
            raise RuntimeError("tracing SDK broken at span start")

    def __exit__(self, *exc_info: object) -> None:
        if self.at == "end":
            raise RuntimeError("tracing SDK broken at span end")


class _BrokenTracer:
    def __init__(self, at: str) -> None:
        self.at = at

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        if self.at == "start":
            raise RuntimeError("tracing SDK broken at span start")
        return _EndlessSpan()

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> _BrokenSpans:
        return _BrokenSpans(self.at)


class _EndlessSpan:
    """A producer span whose end raises."""

    def set_attribute(self, *args: Any) -> None:
        raise RuntimeError("tracing SDK broken at span end")

    set_status = record_exception = end = set_attribute


class _BrokenProvider(TracerProvider):
    def __init__(self, at: str) -> None:
        super().__init__()
        self.at = at

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return _BrokenTracer(self.at)


@pytest.mark.parametrize("at", ["start", "end"])
async def test_a_broken_tracing_sdk_never_holds_a_message_back(
    at: str, database_url: str, tables: Tables, engine: Engine, outbox: Outbox
) -> None:
    previous = tracing._provider
    tracing.use_provider(_BrokenProvider(at))
    try:
        broker = MemoryBroker()
        written = [outbox.message("traced", {"n": n}) for n in range(3)]
        with Session(engine) as session:
            outbox.enqueue_many(session, written)
            session.commit()
        relay = Relay(relay_settings(database_url, tables), broker.publisher())
        async with running_relay(relay):
            await wait_until(lambda: len(broker.messages()) == 3, within=10, what="3 published")
        # Published, and marked so: nothing is published again.
        assert sorted(str(m.id) for m in broker.messages()) == sorted(str(m.id) for m in written)

        rig = Rig("memory")
        name = unique("broken-sdk")
        (topic,) = await rig.topics("orders", consumer=name)
        settings = settings_for(database_url, tables)
        consumer = postroom.Consumer(name, settings)
        runs: list[str] = []

        @consumer.handler(topic)
        async def record(message: postroom.Message, session: AsyncSession) -> None:
            runs.append(str(message.id))

        message = Message.create(topic, {"order": 1})
        service = ConsumerService(consumer, rig.subscriber(settings), settings)
        async with rig.running(service, name):
            await rig.publish([message])
            await wait_until(lambda: runs == [str(message.id)], within=10, what="one run")
    finally:
        tracing.use_provider(previous)
    assert runs == [str(message.id)], "the handler ran once, its first attempt succeeded"
