"""Publish a claimed batch so that each key's messages reach the broker in order.

The batch goes out in rounds: the first message of every key (and every message without
a key) in round one, each key's second message in round two, and so on. Each round is
one pipelined publish. A key whose message was not confirmed sends nothing more from
this batch, so a later message can never overtake an earlier one that failed. Most
batches hold at most one message per key and go out in a single round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from postroom import tracing
from postroom.brokers.base import Outcome, Publisher, PublishResult
from postroom.message import Message


def rounds_by_key(messages: Sequence[Message]) -> list[list[int]]:
    """Indexes of ``messages`` grouped into rounds; keyless messages all go in the first."""
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for index, message in enumerate(messages):
        if message.key is None:
            number = 0
        else:
            number = seen.get(message.key, 0)
            seen[message.key] = number + 1
        if number == len(rounds):
            rounds.append([])
        rounds[number].append(index)
    return rounds


async def publish_in_key_order(
    publisher: Publisher,
    messages: Sequence[Message],
    may_continue: Callable[[], bool] = lambda: True,
    stalled_keys: Mapping[str, int] | None = None,
    positions: Sequence[int] = (),
    confirmed_at: list[float] | None = None,
) -> list[PublishResult | None]:
    """Publish ``messages``; None marks a message held back (not sent, no attempt spent).

    A message is held back when an earlier message of its key was not confirmed (in this
    batch, or in an earlier one whose failure is not recorded yet), when the broker became
    unavailable, or when ``may_continue`` says the lease is running out.

    ``stalled_keys`` maps a key to the position of its first message not confirmed in
    those earlier batches, and ``positions`` gives each message's position (increasing,
    as claimed). A message of a stalled key is held back only if it comes after that
    position (without ``positions``: every message of the key). One that comes before it
    has no unconfirmed predecessor there and may go; holding it too would let two
    batches in flight hold a key back for ever, each for the rows the other left
    unconfirmed.

    ``confirmed_at``, when given (one slot per message), receives for each message sent
    the wall-clock time (``time.time()``) at which the broker answered its round.
    """
    results: list[PublishResult | None] = [None] * len(messages)
    earlier = stalled_keys or {}
    held: set[int] = set()
    for index, message in enumerate(messages):
        first = earlier.get(message.key) if message.key is not None else None
        if first is not None and (not positions or positions[index] > first):
            held.add(index)
    stalled: set[str] = set()
    for round_ in rounds_by_key(messages):
        if not may_continue():
            break
        # Within a batch a held message's later ones come after it: held back as well.
        sendable = [i for i in round_ if i not in held and messages[i].key not in stalled]
        if not sendable:
            continue
        outcomes = await tracing.publish(publisher, [messages[i] for i in sendable])
        if confirmed_at is not None:
            answered = time.time()
            for index in sendable:
                confirmed_at[index] = answered
        broker_down = False
        for index, result in zip(sendable, outcomes, strict=True):
            results[index] = result
            key = messages[index].key
            if not result.confirmed and key is not None:
                stalled.add(key)
            broker_down = broker_down or result.outcome is Outcome.UNAVAILABLE
        if broker_down:
            break
    return results
