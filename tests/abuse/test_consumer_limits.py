"""The consumer process against what can crash it or stall a partition: a message whose
handler kills the process, and a record too large to dead-letter whole.
"""

from __future__ import annotations

import uuid

import pytest

from postroom.brokers.base import HEADER_ERROR
from postroom.message import HEADER_ID
from tests.abuse.harness import BROKERS, CONSUMER_MAX_ATTEMPTS, MIB, PROFILE, Stage
from tests.support.consuming import RawMessage
from tests.support.waiting import wait_until_sync

JSON = "application/json"
CASE_HEADER = "abuse-case"
# The crash loop on Kafka is also in every run of the integration suite
# (test_consumer_hardening_crashes.py); the short profile spends its time on RabbitMQ only.
CRASH_BROKERS = BROKERS if PROFILE.name == "full" else ("rabbitmq",)


@pytest.mark.parametrize("stage", CRASH_BROKERS, indirect=True)
def test_handler_that_kills_the_process_is_dead_lettered_after_its_attempts(
    stage: Stage,
) -> None:
    before = stage.ordinary(PROFILE.others // 2)
    stage.commit(before)
    stage.wait_handled_once([str(m.id) for m in before])
    crash = stage.outbox.message(stage.topic, {"exit": True}, key="crash")
    stage.commit([crash])
    after = stage.ordinary(PROFILE.others - len(before))
    stage.commit(after)
    exits = 0
    for _ in range(CONSUMER_MAX_ATTEMPTS + 2):
        consumer = stage.services[1]
        wait_until_sync(
            lambda: (
                not consumer.alive
                or bool(stage.handlers_run(str(crash.id)))
                or any(d.id == str(crash.id) for d in stage.dead_letters())
            ),
            within=60,
            what="the consumer to exit or the crashing message to be dead-lettered",
            interval=0.1,
        )
        if consumer.alive:
            break
        assert consumer.returncode == 7, consumer.tail()
        exits += 1
        stage.restart_consumer()
    letter = stage.wait_dead_letter(lambda d: d.id == str(crash.id), "the crashing message")
    error = letter.headers.get(HEADER_ERROR, "")
    assert "the consumer process ended" in error, error
    assert stage.handlers_run(str(crash.id)) == []
    problems = []
    # Every other message, written before and after it on keys of their own, is handled
    # once: none is dead-lettered for the crashes of a process that merely held it.
    others = {str(m.id) for m in [*before, *after]}
    innocent = [d.id for d in stage.dead_letters() if d.id in others]
    if innocent:
        problems.append(f"{len(innocent)} other messages dead-lettered: {innocent[:3]}")
    # The first run, then the configured attempts of counted redeliveries. RabbitMQ flags
    # every redelivery: exactly that. Kafka flags the first record of a partition after
    # each assignment, which can also be the crashing record's first delivery (one fewer),
    # and an offset commit lost with a dying process can hide it once (one more).
    runs = CONSUMER_MAX_ATTEMPTS + 1
    allowed = {runs} if stage.broker == "rabbitmq" else {runs - 1, runs, runs + 1}
    if exits not in allowed:
        problems.append(f"{exits} process exits before the dead letter, not {sorted(allowed)}")
    assert not problems, problems
    other = stage.flowing([*before, *after])
    stage.finish(
        "consumer: handler calls os._exit",
        f"dead-lettered after {exits} process exits",
        other,
    )


@pytest.mark.parametrize("stage", ["kafka"], indirect=True)
def test_two_megabyte_undecodable_kafka_record(stage: Stage) -> None:
    tag = uuid.uuid4().hex
    message_id = str(uuid.uuid4())
    behind = str(uuid.uuid4())
    key = f"stall-{tag}"
    body = b'{"broken": "' + b"x" * (2 * MIB)
    others = stage.ordinary(PROFILE.others)
    stage.commit(others[: len(others) // 2])
    stage.raw(
        [
            RawMessage(body, {HEADER_ID: message_id, CASE_HEADER: tag}, JSON, key=key),
            # Same key, same partition, right behind it: the partition must move on.
            RawMessage(b'{"n": 2}', {HEADER_ID: behind}, JSON, key=key),
        ],
        kafka_config={"message.max.bytes": 4 * MIB},
    )
    stage.commit(others[len(others) // 2 :])
    letter = stage.wait_dead_letter(
        lambda d: d.headers.get(CASE_HEADER) == tag, "the 2 MB record", within=60
    )
    error = letter.headers.get(HEADER_ERROR, "")
    assert error, letter.headers
    stage.wait_handled_once([behind])
    assert stage.handlers_run(message_id) == []
    other = stage.flowing(others)
    kept = "with" if len(letter.body) >= len(body) else "without"
    stage.finish(
        "foreign: 2 MB undecodable Kafka record",
        f"dead-lettered {kept} its body; partition moved on",
        other,
        consumer_mib=300,
    )
