"""Subscribing in contract tests: a started subscriber whose deliveries a test takes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

from postroom.brokers import Delivery, Subscriber
from postroom.message import HEADER_ID, Message
from tests.contract.harness import Harness

#: Seconds to wait for a delivery that must come (a Kafka group join takes a few).
ARRIVAL = 30.0
#: Seconds to watch for a delivery that must not come.
QUIET = 1.5


class Taken:
    """A started subscriber whose deliveries are pumped into a queue the test reads."""

    def __init__(self, broker: Harness, subscriber: Subscriber) -> None:
        self.broker = broker
        self.subscriber = subscriber
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for delivery in self.subscriber.deliveries():
            await self.queue.put(delivery)

    async def take(self, count: int, seconds: float = ARRIVAL) -> list[Delivery]:
        """The next ``count`` deliveries; fails if they do not all come in time."""
        taken: list[Delivery] = []
        deadline = time.monotonic() + seconds
        while len(taken) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(taken)} of {count} deliveries within {seconds:g} s"
            with contextlib.suppress(TimeoutError):
                taken.append(await asyncio.wait_for(self.queue.get(), left))
        return taken

    async def receive(self, messages: Sequence[Message]) -> list[Delivery]:
        """Publish ``messages`` and take as many deliveries."""
        await publish(self.broker, messages)
        return await self.take(len(messages))

    async def more(self, seconds: float = QUIET) -> list[Delivery]:
        """Whatever else comes within ``seconds``."""
        await asyncio.sleep(seconds)
        found = []
        while not self.queue.empty():
            found.append(self.queue.get_nowait())
        return found

    async def close(self) -> None:
        """Stop pumping and close the subscriber."""
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        await self.subscriber.close()


@contextlib.asynccontextmanager
async def subscribed(broker: Harness, consumer: str, topics: Sequence[str]) -> AsyncIterator[Taken]:
    """A subscriber of ``consumer`` to ``topics``, closed afterwards."""
    broker.forget_consumer(consumer)
    subscriber = broker.make_subscriber()
    await subscriber.start(consumer, topics)
    taken = Taken(broker, subscriber)
    try:
        yield taken
    finally:
        await taken.close()


async def publish(broker: Harness, messages: Sequence[Message]) -> None:
    """Publish ``messages`` through the broker's own publisher; all must be confirmed."""
    publisher = broker.make_publisher()
    await publisher.connect()
    try:
        results = await publisher.publish(messages)
    finally:
        await publisher.close()
    assert all(result.confirmed for result in results), results


def ids(deliveries: Sequence[Delivery]) -> list[str]:
    """The message ids of ``deliveries``, in order."""
    return [delivery.headers[HEADER_ID] for delivery in deliveries]
