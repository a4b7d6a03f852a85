"""What a consumer counts and measures, on a Prometheus registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from postroom.brokers.base import Lag
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
        self.lag = self.gauge(
            "postroom_consumer_lag_messages",
            "Messages waiting for this consumer: per assigned Kafka partition, its high "
            "watermark minus the first offset not yet acknowledged; on RabbitMQ the ready "
            "messages of the consumer's queue (topic is the queue, partition is empty).",
            "topic",
            "partition",
        )
        self._lag_labels: set[tuple[str, str]] = set()
        self.latency = self.histogram(
            "postroom_consumer_handler_seconds",
            "One handler run with its transaction (inbox insert, handler, commit).",
            "topic",
        )

    def set_lag(self, lag: Lag) -> None:
        """Set the lag gauge to ``lag`` and drop the series of partitions no longer reported
        (revoked): labels come from the subscriber's own topics, queue and partitions."""
        values = {(topic, _partition_label(part)): count for (topic, part), count in lag.items()}
        for gone in self._lag_labels - values.keys():
            self.lag.remove(*gone)
        for labels, messages in values.items():
            self.lag.labels(*labels).set(messages)
        self._lag_labels = set(values)


def _partition_label(partition: int | None) -> str:
    """A partition as its label: its number, or empty for a queue (RabbitMQ, memory)."""
    return "" if partition is None else str(partition)
