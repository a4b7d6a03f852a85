"""From a broker delivery to a :class:`~postroom.message.Message`: its id, payload and headers."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from postroom.brokers.base import HEADER_FOR_CONSUMER, Delivery
from postroom.errors import ConfigurationError, UndecodableMessageError
from postroom.message import (
    HEADER_CONTENT_TYPE,
    HEADER_CREATED_AT,
    HEADER_ID,
    HEADER_KEY,
    OCTET_STREAM,
    RESERVED_HEADER_PREFIX,
    TOPIC_PATTERN,
    Message,
    decode_payload,
    normalize_id,
)

#: Namespace of the UUIDs given to messages whose id (from another producer) is no UUID.
FOREIGN_ID_NAMESPACE: Final = uuid.UUID("6f1d1c3e-5b7a-4f0e-9a51-7e0c2b1d9a10")
_CLOUDEVENTS_HEADERS: Final = ("ce_id", "ce-id", "cloudEvents:id", "cloudEvents_id")
MAX_ID_CHARS: Final = 1000

#: Longest consumer name: it prefixes queue and topic names such as ``<name>.dead-letter``.
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class IdSource:
    """Where message ids are read: ``postroom``, ``amqp``, ``cloudevents``, ``header:<name>``."""

    kind: str
    header: str | None = None

    @classmethod
    def parse(cls, text: str) -> IdSource:
        """Parse the ``consumer_id_source`` setting; raise ConfigurationError if unusable."""
        if text in {"postroom", "amqp", "cloudevents"}:
            return cls(text)
        if text.startswith("header:") and text.removeprefix("header:"):
            return cls("header", text.removeprefix("header:"))
        raise ConfigurationError(
            f"consumer_id_source {text!r} is not one of postroom, amqp, cloudevents or "
            "header:<name> (set POSTROOM_CONSUMER_ID_SOURCE)"
        )

    def read(self, delivery: Delivery) -> str:
        """The id of ``delivery``; raise UndecodableMessageError if it has none."""
        headers = delivery.headers
        found: str | None
        if self.kind == "postroom":
            found, where = headers.get(HEADER_ID), f"the {HEADER_ID} header"
        elif self.kind == "amqp":
            found, where = delivery.broker_message_id, "the AMQP message_id property"
        elif self.kind == "cloudevents":
            found = next((headers[h] for h in _CLOUDEVENTS_HEADERS if headers.get(h)), None)
            where = "a CloudEvents id header (ce_id)"
        else:
            assert self.header is not None
            found, where = headers.get(self.header), f"the {self.header} header"
        if not found or not found.strip():
            raise UndecodableMessageError(
                f"the message has no id in {where}; it cannot be deduplicated, so it is "
                "dead-lettered: have the producer set it, or choose where ids are read with "
                "consumer_id_source (POSTROOM_CONSUMER_ID_SOURCE)"
            )
        if len(found) > MAX_ID_CHARS:
            raise UndecodableMessageError(
                f"the message id in {where} is {len(found)} characters long (limit "
                f"{MAX_ID_CHARS}); use a shorter id"
            )
        return normalize_id(found.strip())


def is_requeue_copy(headers: Mapping[str, str]) -> bool:
    """True if a delivery carrying ``postroom-for-consumer`` is postroom's own requeue copy.

    ``postroom dead-letter requeue`` (Kafka) publishes the copy through postroom's publisher,
    so it carries postroom's envelope: a ``postroom-id`` that is a UUID, beside a
    ``postroom-for-consumer`` that is a valid consumer name. postroom's ``enqueue`` refuses
    user headers starting with ``postroom-``, so no postroom producer sets the header; a
    message without the envelope comes from another producer and the header is ignored.
    """
    name = headers.get(HEADER_FOR_CONSUMER, "")
    if len(name) > MAX_NAME_CHARS or not TOPIC_PATTERN.fullmatch(name):
        return False
    try:
        uuid.UUID(headers.get(HEADER_ID, ""))
    except ValueError:
        return False
    return True


def to_message(delivery: Delivery, message_id: str) -> Message:
    """The Message a handler receives; raise UndecodableMessageError for a bad payload.

    Ids that are not UUIDs (from other producers) become a name-based UUID (uuid5); the
    inbox keeps the id as it was received.
    """
    headers = delivery.headers
    content_type = (
        headers.get(HEADER_CONTENT_TYPE)
        or delivery.content_type
        or headers.get("content-type")
        or OCTET_STREAM
    )
    try:
        decode_payload(delivery.body, content_type)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UndecodableMessageError(
            f"the payload is not valid {content_type} ({exc}); it is dead-lettered: fix the "
            "producer, or send it with another content type"
        ) from None
    except RecursionError:
        raise UndecodableMessageError(
            f"the payload is not valid {content_type} (nested too deeply to decode); it is "
            "dead-lettered: fix the producer"
        ) from None
    try:
        parsed_id = uuid.UUID(message_id)
    except ValueError:
        parsed_id = uuid.uuid5(FOREIGN_ID_NAMESPACE, message_id)
    created = _timestamp(headers.get(HEADER_CREATED_AT))
    return Message(
        id=parsed_id,
        topic=delivery.topic,
        body=delivery.body,
        content_type=content_type,
        created_at=created,
        available_at=created,
        key=headers.get(HEADER_KEY, delivery.key),
        headers={
            name: value
            for name, value in headers.items()
            if not name.lower().startswith(RESERVED_HEADER_PREFIX)
        },
    )


def to_model(message: Message, model: Any) -> Any:
    """``message``'s payload as ``model``: ``model.model_validate(payload)`` if it has one,
    else ``model(**payload)`` for a mapping or ``model(payload)``."""
    payload = message.payload
    try:
        validate = getattr(model, "model_validate", None)
        if callable(validate):
            return validate(payload)
        if isinstance(payload, dict):
            return model(**payload)
        return model(payload)
    except Exception as exc:
        name = getattr(model, "__name__", repr(model))
        raise UndecodableMessageError(
            f"the payload does not fit {name}: {_first_line(exc)}; it is dead-lettered: fix "
            "the producer or the model, then replay it"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _timestamp(text: str | None) -> datetime:
    if text:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC)


def describe_error(exc: BaseException) -> str:
    """``ExceptionType: first line`` for logs and dead-letter headers."""
    return _first_line(exc)
