"""What ``postroom broker setup`` declares for a consumer, worked out without a broker."""

from __future__ import annotations

from postroom.brokers.rabbitmq.topology import (
    Binding,
    Exchange,
    Queue,
    consumer_topology,
    retry_queue_arguments,
    retry_tiers,
)
from postroom.cli.broker import retry_delays
from postroom.config import Settings


def test_retry_delays_follow_the_consumer_backoff() -> None:
    assert retry_delays(Settings()) == (0.5, 8.0)  # 1 s doubling, 5 attempts: 4 retries
    assert retry_delays(Settings(consumer_max_attempts=1)) is None  # never retried
    capped = Settings(consumer_max_attempts=20, consumer_backoff_max=60.0)
    assert retry_delays(capped) == (0.5, 60.0)


def test_retry_tiers_cover_every_delay_between_the_bounds() -> None:
    assert retry_tiers(0.5, 8.0) == [512, 1024, 2048, 4096, 8192]
    assert retry_tiers(0.001, 0.01) == [16]
    assert retry_tiers(0.5, 0.0) == []


def test_consumer_topology_lists_what_the_subscriber_declares_in_order() -> None:
    declared = consumer_topology("billing", ["a", "b"], tiers=[512])
    assert declared == [
        Exchange("postroom"),
        Queue("billing"),
        Binding("postroom", "billing", "a"),
        Binding("postroom", "billing", "b"),
        Queue("billing.retry.512ms", retry_queue_arguments("billing", 512)),
        Queue("billing.dead-letter"),
    ]
    assert retry_queue_arguments("billing", 512) == {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "billing",
        "x-message-ttl": 512,
        "x-expires": 24 * 60 * 60 * 1000,
    }
