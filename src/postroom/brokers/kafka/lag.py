"""A Kafka consumer's lag per partition, from what librdkafka already knows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaException

from postroom.brokers.kafka.settings import Partition, _log


def partition_lag(
    consumer: Any, partitions: Iterable[Partition], first_unacknowledged: Mapping[Partition, int]
) -> dict[Partition, int]:
    """Per partition: its high watermark minus the offset of its first record not yet
    acknowledged (``first_unacknowledged``; for a partition without one, the consumer's
    fetch position), never below 0.

    Reads librdkafka's cached high watermark (updated by every fetch response) and
    position: no request to the broker, nothing that blocks, so it may be called from the
    event loop's thread like every other call on the consumer. A partition whose watermark
    or position is not known yet is left out.
    """
    lag: dict[Partition, int] = {}
    for key in partitions:
        tp = confluent_kafka.TopicPartition(key[0], key[1])
        try:
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            first = first_unacknowledged.get(key)
            if first is None:
                (position,) = consumer.position([tp])
                first = position.offset
        except (KafkaException, RuntimeError) as exc:
            _log.debug("Kafka lag not known", partition=key, error=str(exc))
            continue
        if high is None or high < 0 or first < 0:
            continue
        lag[key] = max(0, high - first)
    return lag
