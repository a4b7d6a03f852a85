"""A task waiting with a timeout stops when it is cancelled, even when what it waited for
arrives in the same turn of the event loop: Python 3.11's ``asyncio.wait_for`` returns the
result then and drops the cancellation, so a consumer told to stop went on for ever."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import postroom
from postroom.brokers.memory import MemoryBroker, MemorySubscriber
from postroom.message import Message

SOURCE = Path(postroom.__file__).parent


async def test_a_delivery_loop_cancelled_as_a_delivery_arrives_stops() -> None:
    subscriber = MemorySubscriber(MemoryBroker(), poll_interval=5.0)
    await subscriber.start("cancel", ["orders"])
    taken: list[str] = []

    async def take() -> None:
        async for delivery in subscriber.deliveries():
            taken.append(str(delivery.message.id))

    task = asyncio.create_task(take())
    await asyncio.sleep(0.05)
    message = Message.create("orders", {"n": 1})
    subscriber.deliver(message)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task}, "the cancelled delivery loop went on"
    assert task.cancelled()
    # The delivery it was handed in that turn was not lost: it is still in the queue.
    assert taken == []
    assert subscriber._queue.qsize() == 1
    await subscriber.close()


def test_the_package_never_uses_asyncio_wait_for() -> None:
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                offenders.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert offenders == [], f"use `async with asyncio.timeout(...)` instead: {offenders}"
