"""What a consumer counts and measures, on a Prometheus registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from postroom.metrics import Metrics

#: The ``topic`` label of deliveries on topics the consumer has no handler for: labels
#: come from the consumer's registered topics only, so hostile topics cannot grow /metrics.
OTHER_TOPIC = "other"


class ConsumerMetrics(Metrics):
    """Counters per outcome and the handler latency of one consumer.

    The ``topic`` label is one of the consumer's registered topics or :data:`OTHER_TOPIC`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        count = self.counter
        self.handled = count(
            "postroom_consumer_handled", "Messages handled and committed.", "topic"
        )
        self.duplicates = count(
            "postroom_consumer_duplicates",
            "Deliveries of messages already in the inbox (acknowledged, handler not run).",
            "topic",
        )
        self.skipped = count(
            "postroom_consumer_skipped",
            "Deliveries meant for another consumer (a requeued dead letter; acknowledged, "
            "handler not run).",
            "topic",
        )
        self.failures = count(
            "postroom_consumer_failures",
            "Handler runs that raised (the transaction was rolled back).",
            "topic",
        )
        self.dead_lettered = count(
            "postroom_consumer_dead_lettered",
            "Messages dead-lettered (attempts exhausted, no id, or undecodable).",
            "topic",
        )
        self.dead_letter_failures = count(
            "postroom_consumer_dead_letter_failures",
            "Dead-letter copies the broker did not take (tried again with backoff; the "
            "message's lane waits meanwhile).",
        )
        self.database_unavailable = count(
            "postroom_consumer_database_unavailable",
            "Handler runs not made because the database could not be reached (no attempt spent).",
        )
        self.inbox_purged = count(
            "postroom_consumer_inbox_purged", "Inbox rows deleted by retention."
        )
        self.in_flight = self.gauge(
            "postroom_consumer_in_flight", "Messages being handled right now."
        )
        self.latency = self.histogram(
            "postroom_consumer_handler_seconds",
            "One handler run with its transaction (inbox insert, handler, commit).",
            "topic",
        )
