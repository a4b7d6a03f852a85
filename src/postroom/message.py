"""The message envelope: what is written to the outbox and what travels on the broker."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypedDict

from postroom._uuid7 import uuid7
from postroom.errors import InvalidMessageError, PayloadTooLargeError

JSON: Final = "application/json"
OCTET_STREAM: Final = "application/octet-stream"
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024

#: Topic names must be valid Kafka topic names and RabbitMQ routing keys alike.
TOPIC_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_KEY_BYTES: Final = 1024
MAX_HEADER_NAME_BYTES: Final = 255

#: Header names postroom puts on the wire; user headers may not start with this prefix.
RESERVED_HEADER_PREFIX: Final = "postroom-"
HEADER_ID: Final = "postroom-id"
HEADER_CONTENT_TYPE: Final = "postroom-content-type"
HEADER_CREATED_AT: Final = "postroom-created-at"
HEADER_KEY: Final = "postroom-key"
#: The headers :meth:`Message.wire_headers` derives from the envelope's own fields.
ENVELOPE_HEADERS: Final = (HEADER_ID, HEADER_CONTENT_TYPE, HEADER_CREATED_AT, HEADER_KEY)


class MessageOptions(TypedDict, total=False):
    """The optional parts of a new message, as keyword arguments of enqueue()."""

    key: str | None
    headers: Mapping[str, str] | None
    delay: timedelta | float | None
    message_id: uuid.UUID | str | None
    content_type: str | None


@dataclass(frozen=True, slots=True)
class Message:
    """One message: the envelope postroom stores in the outbox and publishes.

    Build new messages with :meth:`Message.create` (it validates and encodes); the
    constructor takes already-validated values, as read back from the database or a broker.
    """

    id: uuid.UUID
    topic: str
    body: bytes
    """The payload encoded as sent on the wire."""
    content_type: str
    created_at: datetime
    available_at: datetime
    """When the message may be published (``created_at`` unless delayed)."""
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: timedelta | float | None = None,
        message_id: uuid.UUID | str | None = None,
        content_type: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> Message:
        """Validate the parts of a new message and encode its payload.

        Raises :class:`~postroom.errors.InvalidMessageError` (or its subclass
        :class:`~postroom.errors.PayloadTooLargeError`) with what to change.
        """
        validate_topic(topic)
        validate_key(key)
        checked_headers = validate_headers(headers)
        body, checked_type = encode_payload(payload, content_type)
        if len(body) > max_payload_bytes:
            raise PayloadTooLargeError(len(body), max_payload_bytes)
        now = datetime.now(UTC)
        return cls(
            id=_parse_message_id(message_id) if message_id is not None else uuid7(),
            topic=topic,
            key=key,
            body=body,
            content_type=checked_type,
            headers=checked_headers,
            created_at=now,
            available_at=now + _delay_as_timedelta(delay),
        )

    @property
    def payload(self) -> Any:
        """The payload decoded from ``body``: JSON values for JSON content, else ``bytes``."""
        return decode_payload(self.body, self.content_type)

    @property
    def delay_seconds(self) -> float:
        """Seconds between creation and the time the message may be published."""
        return (self.available_at - self.created_at).total_seconds()

    def wire_headers(self) -> dict[str, str]:
        """The headers to put on the broker message: postroom's own plus the user's."""
        wire = dict(self.headers)
        wire[HEADER_ID] = str(self.id)
        wire[HEADER_CONTENT_TYPE] = self.content_type
        wire[HEADER_CREATED_AT] = self.created_at.isoformat()
        if self.key is not None:
            wire[HEADER_KEY] = self.key
        return wire


def validate_topic(topic: object) -> None:
    """Raise InvalidMessageError unless ``topic`` is a usable topic name."""
    if not isinstance(topic, str):
        raise InvalidMessageError(f"topic must be a str, got {type(topic).__name__}")
    if not topic:
        raise InvalidMessageError(
            "topic is empty; give the name of the stream, e.g. 'orders.created'"
        )
    if len(topic) > 249:
        raise InvalidMessageError(
            f"topic is {len(topic)} characters long; the limit is 249 (Kafka's topic limit)"
        )
    if not TOPIC_PATTERN.fullmatch(topic) or topic in {".", ".."}:
        raise InvalidMessageError(
            f"topic {topic!r} may only contain letters, digits, '.', '_' and '-' "
            "(so it is a valid Kafka topic and RabbitMQ routing key)"
        )


def validate_key(key: object) -> None:
    """Raise InvalidMessageError unless ``key`` is None or a usable ordering key."""
    if key is None:
        return
    if not isinstance(key, str):
        raise InvalidMessageError(
            f"key must be a str or None, got {type(key).__name__}; convert it with str()"
        )
    if not key:
        raise InvalidMessageError("key is an empty string; pass key=None for no key")
    if "\x00" in key:
        raise InvalidMessageError("key contains a NUL character, which PostgreSQL cannot store")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidMessageError(f"key is longer than {MAX_KEY_BYTES} bytes; use a shorter id")


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Return a copy of ``headers`` after checking every name and value is a usable str."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidMessageError(
            f"headers must be a mapping of str to str, got {type(headers).__name__}"
        )
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidMessageError(f"header name {name!r} must be a non-empty str")
        if not isinstance(value, str):
            raise InvalidMessageError(
                f"header {name!r} has a {type(value).__name__} value; header values must be str"
            )
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            raise InvalidMessageError(
                f"header {name!r} uses the reserved prefix {RESERVED_HEADER_PREFIX!r}; rename it"
            )
        if len(name.encode()) > MAX_HEADER_NAME_BYTES:
            raise InvalidMessageError(
                f"header name {name[:40]!r}... is over {MAX_HEADER_NAME_BYTES} bytes"
            )
        if "\x00" in name or "\x00" in value:
            raise InvalidMessageError(
                f"header {name!r} contains a NUL character, which PostgreSQL cannot store"
            )
        checked[name] = value
    return checked


def encode_payload(payload: Any, content_type: str | None = None) -> tuple[bytes, str]:
    """Encode ``payload`` for the wire; return the bytes and their content type.

    ``bytes`` are sent as they are (``application/octet-stream`` unless ``content_type``
    says otherwise); anything else must be JSON-serializable and is sent as compact JSON.
    """
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), content_type or OCTET_STREAM
    if content_type is not None and not _is_json_type(content_type):
        raise InvalidMessageError(
            f"content_type {content_type!r} needs a bytes payload; encode the payload yourself "
            "or leave content_type out to send JSON"
        )
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMessageError(
            f"payload is not JSON-serializable ({exc}); pass JSON-compatible values "
            "(dict, list, str, int, float, bool, None) or bytes with a content_type"
        ) from None
    return text.encode(), content_type or JSON


def decode_payload(body: bytes, content_type: str) -> Any:
    """Decode a wire body by its content type: JSON to Python values, anything else as bytes."""
    if _is_json_type(content_type):
        return json.loads(body)
    return body


def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON or media.endswith("+json")


def _parse_message_id(message_id: uuid.UUID | str) -> uuid.UUID:
    if isinstance(message_id, uuid.UUID):
        return message_id
    if isinstance(message_id, str):
        try:
            return uuid.UUID(message_id)
        except ValueError:
            pass
    raise InvalidMessageError(
        f"message_id {message_id!r} is not a UUID; leave it out to get a time-ordered UUIDv7"
    )


def _delay_as_timedelta(delay: timedelta | float | None) -> timedelta:
    if delay is None:
        return timedelta(0)
    if isinstance(delay, timedelta):
        result = delay
    elif isinstance(delay, int | float) and not isinstance(delay, bool):
        result = timedelta(seconds=delay)
    else:
        raise InvalidMessageError(
            f"delay must be a timedelta or a number of seconds, got {type(delay).__name__}"
        )
    if result < timedelta(0):
        raise InvalidMessageError("delay is negative; pass 0 or a positive duration")
    return result
