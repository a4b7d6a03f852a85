"""Hostile input at enqueue: refused with a typed error, the caller's transaction still usable.

Each case opens one business transaction, enqueues ordinary messages, tries the hostile
one, enqueues more ordinary messages and commits: the hostile message raises its
``InvalidMessageError`` subclass and leaves no row, and every ordinary message of the
transaction (and of the stream written beside it) is published and handled once by the
stage's real relay and consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from postroom.errors import (
    InvalidContentTypeError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidMessageError,
    PayloadTooDeepError,
    PayloadTooLargeError,
    UnencodableTextError,
)
from postroom.outbox import Outbox
from tests.abuse.harness import BROKERS, MIB, PROFILE, Stage


def deep_payload(depth: int) -> Any:
    payload: Any = []
    for _ in range(depth):
        payload = [payload]
    return payload


Attempt = Callable[[Outbox, Session, str], Any]

CASES: dict[str, tuple[Attempt, type[InvalidMessageError]]] = {
    "100k-deep payload": (
        lambda o, s, t: o.enqueue(s, t, deep_payload(100_000)),
        PayloadTooDeepError,
    ),
    "lone surrogate in payload": (
        lambda o, s, t: o.enqueue(s, t, {"text": "half \ud800 a pair"}),
        UnencodableTextError,
    ),
    "lone surrogate in header": (
        lambda o, s, t: o.enqueue(s, t, {}, headers={"h": "\udfff"}),
        UnencodableTextError,
    ),
    "infinite delay": (
        lambda o, s, t: o.enqueue(s, t, {}, delay=float("inf")),
        InvalidDelayError,
    ),
    "huge delay": (lambda o, s, t: o.enqueue(s, t, {}, delay=1e18), InvalidDelayError),
    "NUL in content_type": (
        lambda o, s, t: o.enqueue(s, t, b"x", content_type="text/plain\x00"),
        InvalidContentTypeError,
    ),
    "over-long content_type": (
        lambda o, s, t: o.enqueue(s, t, b"x", content_type="text/" + "x" * 10_000),
        InvalidContentTypeError,
    ),
    "thousands of headers": (
        lambda o, s, t: o.enqueue(s, t, {}, headers={f"h{i}": "v" for i in range(5000)}),
        InvalidHeaderError,
    ),
    "oversized payload+headers": (
        lambda o, s, t: o.enqueue(
            s,
            t,
            b"p" * (MIB - 64 * 1024),
            headers={f"h{i}": "v" * 1000 for i in range(90)},
        ),
        PayloadTooLargeError,
    ),
}


@pytest.mark.parametrize("stage", BROKERS, indirect=True)
@pytest.mark.parametrize("case", list(CASES))
def test_enqueue_rejects(stage: Stage, case: str) -> None:
    attempt, expected = CASES[case]
    before = stage.ordinary(PROFILE.others // 2)
    after = stage.ordinary(PROFILE.others - len(before))
    rows_before = stage.outbox_rows()
    with Session(stage.engine) as session, session.begin():
        stage.outbox.enqueue_many(session, before)
        with pytest.raises(expected) as raised:
            attempt(stage.outbox, session, stage.topic)
        # The transaction is still usable: a statement runs, more messages go in.
        assert session.execute(text("SELECT 1")).scalar_one() == 1
        stage.outbox.enqueue_many(session, after)
    message = str(raised.value)
    assert message
    assert "Traceback" not in message
    # Nothing of the hostile message reached the outbox; the whole transaction did.
    assert stage.outbox_rows() == rows_before + len(before) + len(after)
    other = stage.flowing([*before, *after])
    stage.finish(f"enqueue: {case}", f"rejected: {expected.__name__}", other)
