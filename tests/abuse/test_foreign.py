"""Producers that are not postroom, publishing straight to the broker (aio-pika,
confluent-kafka): what the real consumer process makes of their messages.

Each case writes ordinary messages through the outbox before and after the hostile input;
all of them must be handled once while the consumer deals with it.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from postroom.brokers.base import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_FOR_CONSUMER, HEADER_TOPIC
from postroom.consumer.decoding import FOREIGN_ID_NAMESPACE
from postroom.message import HEADER_ID, Message
from tests.abuse.harness import BROKERS, PROFILE, Stage
from tests.support.consuming import RawMessage
from tests.support.readback import Delivered

JSON = "application/json"
CASE_HEADER = "abuse-case"


def alongside(stage: Stage, send: Callable[[], None]) -> list[Message]:
    """Commit ordinary messages, ``send()`` the hostile input, commit more; return them all."""
    before = stage.ordinary(PROFILE.others // 2)
    stage.commit(before)
    send()
    after = stage.ordinary(PROFILE.others - len(before))
    stage.commit(after)
    return [*before, *after]


def tagged(tag: str) -> Callable[[Delivered], bool]:
    return lambda d: d.headers.get(CASE_HEADER) == tag


def dead_lettered(
    stage: Stage,
    body: bytes,
    headers: dict[str, str],
    reason: str,
    *,
    attempts: int | None = 1,
    **publish: Any,
) -> tuple[str, str]:
    """Send one hostile message; check it is dead-lettered with ``reason`` (in its
    ``postroom-error``) and no handler ran for it. Its error, and how the others fared."""
    tag = uuid.uuid4().hex
    message_id = headers.get(HEADER_ID)
    others = alongside(
        stage,
        lambda: stage.raw([RawMessage(body, {**headers, CASE_HEADER: tag}, JSON)], **publish),
    )
    letter = stage.wait_dead_letter(tagged(tag), reason)
    error = letter.headers.get(HEADER_ERROR, "")
    assert reason in error, error
    if attempts is not None:
        assert letter.headers.get(HEADER_ATTEMPTS) == str(attempts), letter.headers
    if message_id is not None:
        assert stage.handlers_run(message_id) == []
    return error, stage.flowing(others)


def handled_once(stage: Stage, messages: list[RawMessage], message_id: str) -> str:
    """Send ``messages`` (all one message to the inbox); check the ``hostile`` handler ran
    exactly once for ``message_id`` and no other handler ran. How the others fared."""
    mark = stage.consumer_mark()
    others = alongside(stage, lambda: stage.raw(messages))
    stage.wait_handled_once([message_id])
    duplicates = len(messages) - 1
    if duplicates:
        stage.wait_consumer_event(
            "consumer.duplicate", after=mark, count=duplicates, message_id=message_id
        )
    assert stage.handlers_run(message_id) == ["hostile"]
    return stage.flowing(others)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_invalid_utf8_json(stage: Stage) -> None:
    body = b'{"text": "\xff\xfe not utf-8"}'
    _, other = dead_lettered(
        stage, body, {HEADER_ID: str(uuid.uuid4())}, "not valid application/json"
    )
    stage.finish("foreign: invalid UTF-8 JSON", "dead-lettered: not valid JSON", other)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_deep_json(stage: Stage) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    _, other = dead_lettered(
        stage, body, {HEADER_ID: str(uuid.uuid4())}, "not valid application/json", attempts=1
    )
    stage.finish("foreign: 100k-deep JSON", "dead-lettered at once: not valid JSON", other)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_no_id(stage: Stage) -> None:
    _, other = dead_lettered(stage, b'{"no": "id"}', {}, "has no id")
    stage.finish("foreign: no id", "dead-lettered: has no id", other)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_one_uuid_in_every_spelling(stage: Stage) -> None:
    for _ in range(PROFILE.spellings_rounds):
        same = uuid.uuid4()
        spellings = [
            str(same),
            str(same).upper(),
            "{" + str(same) + "}",
            f"urn:uuid:{same}",
            same.hex,
            "{" + same.hex.upper() + "}",
        ]
        messages = [RawMessage(b'{"n": 1}', {HEADER_ID: s}, JSON) for s in spellings]
        other = handled_once(stage, messages, str(same))
    stage.finish(
        "foreign: one UUID in 6 spellings",
        f"handled once ({PROFILE.spellings_rounds}x), 5 duplicates acked",
        other,
    )


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_spoofed_for_consumer_header(stage: Stage) -> None:
    # Another producer's id (not a UUID), so the message is not one of postroom's own
    # requeue copies: the header means nothing, the message is handled and a warning logged.
    foreign_id = f"order-{uuid.uuid4().hex}"
    spoofed = {HEADER_ID: foreign_id, HEADER_FOR_CONSUMER: "someone-else"}
    mark = stage.consumer_mark()
    handled_as = str(uuid.uuid5(FOREIGN_ID_NAMESPACE, foreign_id))
    other = handled_once(stage, [RawMessage(b'{"n": 1}', spoofed, JSON)], handled_as)
    if stage.broker == "kafka":
        stage.wait_consumer_event("consumer.foreign_for_consumer_header", after=mark)
        fate = "handled once, warning logged"
    else:
        # RabbitMQ: requeue copies go to the consumer's own queue, so the subscriber drops
        # the header from every delivery; it can neither skip nor be worth a warning.
        fate = "handled once (header dropped by the subscriber)"
    stage.finish("foreign: spoofed postroom-for-consumer", fate, other)


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_spoofed_topic_header(stage: Stage) -> None:
    message_id = str(uuid.uuid4())
    spoofed = {HEADER_ID: message_id, HEADER_TOPIC: stage.decoy}
    other = handled_once(stage, [RawMessage(b'{"n": 1}', spoofed, JSON)], message_id)
    stage.finish("foreign: spoofed postroom-topic", "own topic's handler once, decoy never", other)


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + ".-_") for _ in range(length))


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_random_topic_and_header_values_keep_metrics_bounded(stage: Stage) -> None:
    rng = random.Random()
    ids = [str(uuid.uuid4()) for _ in range(PROFILE.label_flood)]
    warm = str(uuid.uuid4())
    handled_once(stage, [RawMessage(b"{}", {HEADER_ID: warm}, JSON)], warm)
    before = len(stage.metrics())
    flood = [
        RawMessage(
            b"{}",
            {
                HEADER_ID: message_id,
                HEADER_TOPIC: random_text(rng, 24),
                random_text(rng, 12): random_text(rng, 30),
            },
            JSON,
        )
        for message_id in ids
    ]
    others = alongside(stage, lambda: stage.raw(flood))
    stage.wait_handled_once(ids, within=120)
    other = stage.flowing(others)
    after = len(stage.metrics())
    assert after < before + 4096, f"/metrics grew from {before} to {after} bytes"
    stage.finish(
        f"foreign: {PROFILE.label_flood} random topic/header values",
        f"all handled once; /metrics {before} -> {after} B",
        other,
    )


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
def test_thousands_of_headers(stage: Stage) -> None:
    message_id = str(uuid.uuid4())
    # A RabbitMQ producer cannot send more than fits one frame (128 KB by default): the
    # broker closes its connection first. About 5,000 short headers fit.
    count = PROFILE.many_headers if stage.broker == "kafka" else min(PROFILE.many_headers, 5000)
    headers = {f"x-{i}": f"value-{i}" for i in range(count)}
    other = handled_once(
        stage, [RawMessage(b"{}", {**headers, HEADER_ID: message_id}, JSON)], message_id
    )
    stage.finish(f"foreign: {count} headers", "handled once", other)
