"""The consume side: handlers that run once per message, in a transaction with the inbox row.

    consumer = postroom.Consumer("billing")

    @consumer.handler("orders.created")
    async def charge(message: postroom.Message, session: AsyncSession) -> None:
        ...  # writes here commit together with the inbox row

Run it with ``postroom consume module:consumer``; test handlers with :mod:`postroom.testing`.
"""

from postroom.consumer.metrics import ConsumerMetrics
from postroom.consumer.processing import Disposition, Processor, Result
from postroom.consumer.registry import Consumer, HandlerSpec
from postroom.consumer.runner import ConsumerService

__all__ = [
    "Consumer",
    "ConsumerMetrics",
    "ConsumerService",
    "Disposition",
    "HandlerSpec",
    "Processor",
    "Result",
]
