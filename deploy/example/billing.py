"""The example consumer the deploy files run: ``postroom consume billing:consumer``.

It handles ``orders.created`` by enqueueing a ``charges.made`` follow-up in the same
transaction as its inbox row, and handles ``charges.made`` by logging it. Replace it with
your own module (see deploy/Dockerfile, stage ``example``). ``BILLING_CONSUMER_NAME`` names
the consumer (its queue / consumer group); it defaults to ``billing``.
"""

from __future__ import annotations

import logging
import os

from sqlalchemy.ext.asyncio import AsyncSession

import postroom

log = logging.getLogger("billing")

consumer = postroom.Consumer(os.environ.get("BILLING_CONSUMER_NAME", "billing"))


@consumer.handler("orders.created")
async def charge(message: postroom.Message, session: AsyncSession) -> None:
    """Announce the charge: the follow-up commits (or vanishes) with this transaction."""
    order = message.payload
    await consumer.outbox.enqueue_async(
        session, "charges.made", {"order_id": order["order_id"]}, key=message.key
    )


@consumer.handler("charges.made")
async def send_receipt(message: postroom.Message, session: AsyncSession) -> None:
    """Log the charge a receipt would be sent for."""
    log.info("receipt for order %s", message.payload["order_id"])
