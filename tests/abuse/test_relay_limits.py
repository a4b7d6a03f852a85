"""Oversized rows through the real relay: what the broker can never take is dead at once
with a reason naming the limit (no reconnect loop, no retries), what it can take is
published, and the relay's memory is bounded by bytes, not rows.
"""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from tests.abuse.harness import BROKERS, MIB, PROFILE, Stage


def connections(stage: Stage) -> int:
    """How often the shared relay connected to its broker (RabbitMQ logs each connect)."""
    relay, _ = stage.services
    return len(relay.events("connected"))


@pytest.mark.parametrize("stage", ["rabbitmq"], indirect=True)
def test_header_over_rabbitmq_frame_max(stage: Stage) -> None:
    connected = connections(stage)
    before = stage.ordinary(PROFILE.others // 2)
    after = stage.ordinary(PROFILE.others - len(before))
    with Session(stage.engine) as session, session.begin():
        stage.outbox.enqueue_many(session, before)
        big = stage.outbox.enqueue(
            session, stage.topic, {"n": 1}, key="big", headers={"blob": "h" * 200 * 1024}
        )
        stage.outbox.enqueue_many(session, after)
    _, error, attempts = stage.wait_row(big.id, "dead")
    assert error is not None
    assert "too large for the broker" in error, error
    assert "frame_max" in error, error
    assert attempts == 1, "what can never fit is not retried"
    other = stage.flowing([*before, *after])
    assert stage.handlers_run(str(big.id)) == []
    assert connections(stage) == connected, "the relay reconnected: the frame reached RabbitMQ"
    stage.finish("relay: 200 KB header", f"dead at once: {error[:48]}...", other)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_ten_megabyte_body(stage: Stage) -> None:
    """Kafka refuses it (message.max.bytes, 1 MB by default): dead at once. RabbitMQ takes
    up to the publisher's max_message_bytes (16 MiB by default): published and handled."""
    others = stage.ordinary(PROFILE.others)
    with Session(stage.engine) as session, session.begin():
        stage.outbox.enqueue_many(session, others[: len(others) // 2])
        big = stage.big_outbox.enqueue(session, stage.topic, b"b" * 10 * MIB, key="ten-mb")
        stage.outbox.enqueue_many(session, others[len(others) // 2 :])
    if stage.broker == "kafka":
        _, error, attempts = stage.wait_row(big.id, "dead")
        assert error is not None
        assert "too large for the broker" in error, error
        assert "message.max.bytes" in error, error
        assert attempts == 1
        fate = f"dead at once: {error[:48]}..."
    else:
        stage.wait_row(big.id, "published", within=60)
        stage.wait_handled_once([str(big.id)], within=60)
        fate = "published, handled once"
    other = stage.flowing(others)
    stage.finish("relay: 10 MB body", fate, other, consumer_mib=400)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_many_one_mebibyte_rows_keep_relay_memory_bounded(stage: Stage) -> None:
    relay = stage.restart_relay()  # its memory peak counts from here
    rows = PROFILE.big_rows
    # Kafka's producer takes records up to 1,000,000 bytes by default (key, value and
    # headers): its rows stay just under that; RabbitMQ's are a full MiB.
    size = 990_000 if stage.broker == "kafka" else MIB - 4096
    written = []
    for start in range(0, rows, 10):
        with Session(stage.engine) as session, session.begin():
            written += [
                stage.outbox.enqueue(session, stage.topic, b"m" * size, key=f"big-{start + i}")
                for i in range(min(10, rows - start))
            ]
    others = stage.ordinary(PROFILE.others)
    stage.commit(others)
    for message in written:
        stage.wait_row(message.id, "published", within=60)
    stage.wait_handled_once([str(m.id) for m in written], within=60)
    other = stage.flowing(others)
    peak = relay.sample_rss() / 1024
    stage.finish(
        f"relay: {rows} rows of {'0.99 MB' if stage.broker == 'kafka' else '1 MiB'}",
        f"all published and handled once; relay peak {peak:.0f} MiB",
        other,
        relay_mib=200,
        consumer_mib=400,
    )
