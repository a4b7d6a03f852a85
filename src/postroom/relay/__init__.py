"""The relay: publishes committed outbox rows to a broker, confirmed, ordered per key."""

from postroom.relay.service import Relay

__all__ = ["Relay"]
