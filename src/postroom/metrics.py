"""Prometheus metrics and the small HTTP endpoint that serves them with health checks."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from postroom.errors import RefusedSettingError
from postroom.log import get_logger

#: Where the endpoint listens unless told otherwise: this machine only.
DEFAULT_METRICS_HOST: Final = "127.0.0.1"

#: Latency buckets in seconds, from a millisecond to a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Finer buckets for the relay's stages (claim delay, publish), which take milliseconds:
#: a p99 read from them is within a few milliseconds up to 50 ms.
STAGE_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05,
    0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


class BatchHistogram(Collector):
    """A histogram (exposed like ``prometheus_client.Histogram``) that takes a whole
    batch of observations in one call.

    The relay observes the latency of every message it publishes; observing them one by
    one through ``Histogram.observe`` (a lock and a bucket walk each) cost more than a
    tenth of the relay's time per message. Here a batch costs one lock and one binary
    search per value.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        """Record every value of ``values``."""
        values = list(values)
        if not values:
            return
        slot = bisect.bisect_left
        bounds = self.bounds
        with self._lock:
            counts = self._counts
            for value in values:
                counts[slot(bounds, value)] += 1
            self._sum += math.fsum(values)

    def collect(self) -> Iterator[Metric]:
        """The histogram as Prometheus exposes it (cumulative buckets, sum and count)."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*self.bounds, math.inf], counts, strict=True):
            cumulative += count
            label = "+Inf" if bound == math.inf else _float_label(bound)
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)

    def describe(self) -> Iterator[Metric]:
        """The metric's name and type, without values (for registration)."""
        yield HistogramMetricFamily(self.name, self.documentation)


def _float_label(value: float) -> str:
    """A bucket bound as ``prometheus_client`` prints it (``0.005``, ``1.0``)."""
    return repr(float(value))


class Metrics:
    """A service's metrics, on a registry of its own unless one is given.

    Subclasses declare each metric in one call of :meth:`counter`, :meth:`gauge` or
    :meth:`histogram` (latency buckets).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

    def counter(self, name: str, documentation: str, *labels: str) -> Counter:
        """A counter on this registry, with ``labels`` if any."""
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        """A gauge on this registry, with ``labels`` if any."""
        return Gauge(name, documentation, labels, registry=self.registry)

    def histogram(self, name: str, documentation: str, *labels: str) -> Histogram:
        """A histogram of seconds (:data:`LATENCY_BUCKETS`) on this registry."""
        return Histogram(
            name, documentation, labels, buckets=LATENCY_BUCKETS, registry=self.registry
        )


class RelayMetrics(Metrics):
    """What a relay counts and measures."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        count, gauge = self.counter, self.gauge
        self.published = count("postroom_relay_published", "Messages the broker confirmed.")
        self.failed = count(
            "postroom_relay_failed",
            "Publish attempts the broker or client refused (each costs an attempt).",
        )
        self.unavailable = count(
            "postroom_relay_unavailable",
            "Messages not confirmed because the broker was unreachable (no attempt spent).",
        )
        self.dead_lettered = count(
            "postroom_relay_dead_lettered", "Rows dead-lettered after their last attempt."
        )
        self.fenced = count(
            "postroom_relay_fenced",
            "Outcomes not recorded because another relay had re-claimed the row.",
        )
        self.backlog = gauge(
            "postroom_outbox_pending", "Rows waiting to be published (all relays)."
        )
        self.oldest_pending_age = gauge(
            "postroom_outbox_oldest_pending_age_seconds",
            "Seconds the oldest due row has waited to be published "
            "(a delayed row counts from when it is due).",
        )
        self.dead_rows = gauge("postroom_outbox_dead", "Dead-lettered rows in the outbox.")
        self.dead_tuples = gauge(
            "postroom_outbox_dead_tuples",
            "Dead tuples in the outbox table and its partitions, as PostgreSQL's statistics "
            "count them (pg_stat_user_tables.n_dead_tup); vacuum removes them.",
        )
        self.oldest_transaction_age = gauge(
            "postroom_database_oldest_transaction_age_seconds",
            "Seconds the oldest transaction holding back vacuum in the outbox's database has "
            "been open (only the relay role's own sessions without pg_read_all_stats).",
        )
        self.owned_partitions = gauge(
            "postroom_relay_owned_partitions", "Partitions this relay holds."
        )
        self.broker_connected = gauge(
            "postroom_relay_broker_connected", "1 while the broker answers, else 0."
        )
        self.latency = BatchHistogram(
            "postroom_relay_delivery_latency_seconds",
            "From enqueue to broker confirmation, per published message.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.claim_delay = BatchHistogram(
            "postroom_relay_claim_delay_seconds",
            "From a message's due time (its enqueue, or when a delayed or retried row became "
            "due) to this relay's claim returning it, per published message.",
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.publish_seconds = BatchHistogram(
            "postroom_relay_publish_seconds",
            "From this relay's claim returning a message to the broker's confirm of it "
            "(including any wait for the batch ahead), per published message.",
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = self.histogram(
            "postroom_relay_batch_seconds", "Claim, publish and mark of one batch."
        )


#: Longest request line or header line the endpoint reads, and most header lines.
MAX_REQUEST_LINE: Final = 8192
MAX_HEADER_LINES: Final = 100
#: Seconds a client has to send its request.
REQUEST_TIMEOUT: Final = 5.0
#: What the endpoint still reads of a bad request before it closes the connection.
DISCARD_BYTES: Final = 1024 * 1024
DISCARD_SECONDS: Final = 1.0

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}

log = get_logger("metrics")


class _BadRequest(Exception):
    """The client sent something that is not a small HTTP/1.x GET request."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def _read_path(reader: asyncio.StreamReader) -> bytes:
    """The path of an HTTP GET/HEAD request; _BadRequest for anything else."""
    try:
        line = await reader.readuntil(b"\n")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _BadRequest(400, "not an HTTP/1.x request line")
        if parts[0] not in (b"GET", b"HEAD"):
            raise _BadRequest(405, "only GET and HEAD are served")
        for _ in range(MAX_HEADER_LINES):
            if (await reader.readuntil(b"\n")).strip() == b"":
                return parts[1].split(b"?", 1)[0]
    except (asyncio.LimitOverrunError, ValueError):
        raise _BadRequest(400, "request line or header too long") from None
    raise _BadRequest(400, "too many header lines")


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read what the client is still sending (bounded), so closing does not reset the
    connection before it has read the answer."""
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(DISCARD_SECONDS):
            for _ in range(DISCARD_BYTES // 65536):
                if not await reader.read(65536):
                    break


def _response(status: int, content_type: str, body: bytes) -> bytes:
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return header.encode() + body


async def serve_http(
    port: int,
    registry: CollectorRegistry,
    *,
    healthy: Callable[[], bool],
    ready: Callable[[], bool],
    host: str = DEFAULT_METRICS_HOST,
) -> asyncio.Server:
    """Serve /metrics, /healthz and /readyz on ``host``:``port`` until the server is closed.

    Requests that are not small HTTP/1.x GETs get 400 (or 405) and a debug log line, never
    a traceback; unknown paths get 404.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        text = "text/plain; charset=utf-8"
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    path = await _read_path(reader)
            except _BadRequest as bad:
                log.debug("metrics.bad_request", status=bad.status, reason=str(bad))
                writer.write(_response(bad.status, text, f"{bad}\n".encode()))
                await writer.drain()
                await _discard(reader)
            else:
                if path == b"/metrics":
                    status, content_type, body = 200, CONTENT_TYPE_LATEST, generate_latest(registry)
                elif path in (b"/healthz", b"/readyz"):
                    ok = healthy() if path == b"/healthz" else ready()
                    status, content_type = (200 if ok else 503), text
                    body = b"ok\n" if ok else b"not ready\n"
                else:
                    status, content_type, body = 404, text, b"not found\n"
                writer.write(_response(status, content_type, body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or was too slow: nothing to answer
        except Exception as exc:  # a bad client must never take the endpoint down
            log.warning("metrics.request_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_LINE)
    except OSError as exc:
        raise RefusedSettingError(
            f"cannot serve metrics on {host} port {port} ({exc.strerror}); choose another "
            "port with --metrics-port / POSTROOM_METRICS_PORT (0 turns the endpoint off) or "
            "another address with --metrics-host / POSTROOM_METRICS_HOST"
        ) from exc
