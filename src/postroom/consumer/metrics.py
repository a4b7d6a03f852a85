"""What a consumer counts and measures, on a Prometheus registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from postroom.metrics import LATENCY_BUCKETS


class ConsumerMetrics:
    """Counters per outcome and the handler latency of one consumer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.handled = Counter(
            "postroom_consumer_handled", "Messages handled and committed.", ["topic"], registry=r
        )
        self.duplicates = Counter(
            "postroom_consumer_duplicates",
            "Deliveries of messages already in the inbox (acknowledged, handler not run).",
            ["topic"],
            registry=r,
        )
        self.skipped = Counter(
            "postroom_consumer_skipped",
            "Deliveries meant for another consumer (a requeued dead letter; acknowledged, "
            "handler not run).",
            ["topic"],
            registry=r,
        )
        self.failures = Counter(
            "postroom_consumer_failures",
            "Handler runs that raised (the transaction was rolled back).",
            ["topic"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "postroom_consumer_dead_lettered",
            "Messages dead-lettered (attempts exhausted, no id, or undecodable).",
            ["topic"],
            registry=r,
        )
        self.database_unavailable = Counter(
            "postroom_consumer_database_unavailable",
            "Handler runs not made because the database could not be reached (no attempt spent).",
            registry=r,
        )
        self.inbox_purged = Counter(
            "postroom_consumer_inbox_purged", "Inbox rows deleted by retention.", registry=r
        )
        self.in_flight = Gauge(
            "postroom_consumer_in_flight", "Messages being handled right now.", registry=r
        )
        self.latency = Histogram(
            "postroom_consumer_handler_seconds",
            "One handler run with its transaction (inbox insert, handler, commit).",
            ["topic"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
