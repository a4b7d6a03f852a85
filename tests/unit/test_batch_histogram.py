"""BatchHistogram is exposed exactly like prometheus_client's Histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest

from postroom.metrics import LATENCY_BUCKETS, BatchHistogram

VALUES = [0.0004, 0.001, 0.0049, 0.005, 0.2, 3.0, 59.0, 61.0, 1000.0]


def test_batch_histogram_exposes_what_a_histogram_observing_one_by_one_exposes() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("latency_seconds", "Latency.", buckets=LATENCY_BUCKETS, registry=ours)
    single = Histogram("latency_seconds", "Latency.", buckets=LATENCY_BUCKETS, registry=theirs)

    batch.observe_many(VALUES[:4])
    batch.observe_many([])
    batch.observe_many(VALUES[4:])
    for value in VALUES:
        single.observe(value)

    def samples(registry: CollectorRegistry) -> list[str]:
        # Histogram also exports a _created timestamp, which differs by nature.
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert samples(ours) == samples(theirs)
    assert 'latency_seconds_bucket{le="0.005"} 4.0' in samples(ours)
    assert "latency_seconds_count 9.0" in samples(ours)
