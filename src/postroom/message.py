"""The message envelope: what is written to the outbox and what travels on the broker."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypedDict

from postroom._uuid7 import uuid7
from postroom.encoding import JsonDefault, encode_json
from postroom.errors import (
    InvalidContentTypeError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidKeyError,
    InvalidMessageError,
    InvalidTopicError,
    PayloadTooDeepError,
    PayloadTooLargeError,
    UnencodableTextError,
)

JSON: Final = "application/json"
OCTET_STREAM: Final = "application/octet-stream"
DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024

#: Topic names must be valid Kafka topic names and RabbitMQ routing keys alike.
TOPIC_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
MAX_TOPIC_CHARS: Final = 249
MAX_KEY_BYTES: Final = 1024
MAX_HEADER_NAME_BYTES: Final = 255
#: Most user headers on one message; their bytes also count toward ``max_payload_bytes``.
MAX_HEADERS: Final = 100
MAX_CONTENT_TYPE_CHARS: Final = 255
#: Deepest nesting of lists and objects in a JSON payload.
MAX_PAYLOAD_DEPTH: Final = 100
#: Longest ``delay`` enqueue() accepts.
MAX_DELAY: Final = timedelta(days=365)

_CONTENT_TYPE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(;[\x20-\x7e]*)?")
_JSON_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS: Final = re.compile(r"[\[\]{}]")
_UUID_SHAPED: Final = re.compile(
    r"(?i)(?:urn:uuid:)?\{?(?P<hex>[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12})\}?"
)

#: Header names postroom puts on the wire; user headers may not start with this prefix.
RESERVED_HEADER_PREFIX: Final = "postroom-"
HEADER_ID: Final = "postroom-id"
HEADER_CONTENT_TYPE: Final = "postroom-content-type"
HEADER_CREATED_AT: Final = "postroom-created-at"
HEADER_KEY: Final = "postroom-key"
#: The headers :meth:`Message.wire_headers` derives from the envelope's own fields.
ENVELOPE_HEADERS: Final = (HEADER_ID, HEADER_CONTENT_TYPE, HEADER_CREATED_AT, HEADER_KEY)
HEADER_CORRELATION_ID: Final = "postroom-correlation-id"
"""The conversation a message belongs to: set on follow-ups enqueued in a handler."""
HEADER_CAUSATION_ID: Final = "postroom-causation-id"
"""The id of the message whose handler enqueued this one."""
#: The ``postroom-`` headers a user may also set (postroom never overwrites them).
USER_SETTABLE_HEADERS: Final = frozenset({HEADER_CORRELATION_ID, HEADER_CAUSATION_ID})


class MessageOptions(TypedDict, total=False):
    """The optional parts of a new message, as keyword arguments of enqueue()."""

    key: str | None
    headers: Mapping[str, str] | None
    delay: timedelta | float | None
    message_id: uuid.UUID | str | None
    content_type: str | None
    json_default: JsonDefault | None


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
        json_default: JsonDefault | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> Message:
        """Validate the parts of a new message and encode its payload.

        The payload may hold ``Decimal``, ``datetime``/``date``/``time``, ``UUID``,
        ``Enum``, dataclasses and pydantic models beside JSON's own types (see
        :mod:`postroom.encoding`); ``json_default`` is asked about any other value.

        Raises a subclass of :class:`~postroom.errors.InvalidMessageError` (e.g.
        :class:`~postroom.errors.PayloadTooLargeError`) with what to change; see the README's
        "Limits" section for every bound.
        """
        validate_topic(topic)
        validate_key(key)
        checked_headers = validate_headers(headers)
        checked_delay = validate_delay(delay)
        body, checked_type = encode_payload(payload, content_type, json_default)
        size = message_size(body, checked_headers)
        if size > max_payload_bytes:
            raise PayloadTooLargeError(size, max_payload_bytes)
        now = datetime.now(UTC)
        return cls(
            id=_parse_message_id(message_id) if message_id is not None else uuid7(),
            topic=topic,
            key=key,
            body=body,
            content_type=checked_type,
            headers=checked_headers,
            created_at=now,
            available_at=now + checked_delay,
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
    """Raise InvalidTopicError unless ``topic`` is a usable topic name."""
    if not isinstance(topic, str):
        raise InvalidTopicError(f"topic must be a str, got {type(topic).__name__}")
    if not topic:
        raise InvalidTopicError(
            "topic is empty; give the name of the stream, e.g. 'orders.created'"
        )
    if len(topic) > MAX_TOPIC_CHARS:
        raise InvalidTopicError(
            f"topic is {len(topic)} characters long; the limit is {MAX_TOPIC_CHARS} "
            "(Kafka's topic limit)"
        )
    if not TOPIC_PATTERN.fullmatch(topic) or topic in {".", ".."}:
        raise InvalidTopicError(
            f"topic {_shown(topic)} may only contain letters, digits, '.', '_' and '-' "
            "(so it is a valid Kafka topic and RabbitMQ routing key)"
        )


def validate_key(key: object) -> None:
    """Raise InvalidKeyError unless ``key`` is None or a usable ordering key."""
    if key is None:
        return
    if not isinstance(key, str):
        raise InvalidKeyError(
            f"key must be a str or None, got {type(key).__name__}; convert it with str()"
        )
    if not key:
        raise InvalidKeyError("key is an empty string; pass key=None for no key")
    if "\x00" in key:
        raise InvalidKeyError("key contains a NUL character, which PostgreSQL cannot store")
    if len(_utf8(key, "key")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key is longer than {MAX_KEY_BYTES} bytes; use a shorter id")


def validate_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Return a copy of ``headers`` after checking every name and value is a usable str.

    At most :data:`MAX_HEADERS` headers; their size counts toward the message size limit
    (see :func:`message_size`).
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeaderError(
            f"headers must be a mapping of str to str, got {type(headers).__name__}"
        )
    if len(headers) > MAX_HEADERS:
        raise InvalidHeaderError(
            f"there are {len(headers)} headers, over the limit of {MAX_HEADERS}; "
            "put the extra data in the payload"
        )
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidHeaderError(f"header name {_shown(name)} must be a non-empty str")
        if not isinstance(value, str):
            raise InvalidHeaderError(
                f"header {_shown(name)} has a {type(value).__name__} value; "
                "header values must be str"
            )
        if name.lower().startswith(RESERVED_HEADER_PREFIX) and name not in USER_SETTABLE_HEADERS:
            raise InvalidHeaderError(
                f"header {_shown(name)} uses the reserved prefix {RESERVED_HEADER_PREFIX!r}; "
                "rename it (of postroom's headers only "
                f"{', '.join(sorted(USER_SETTABLE_HEADERS))} may be set)"
            )
        if "\x00" in name or "\x00" in value:
            raise InvalidHeaderError(
                f"header {_shown(name)} contains a NUL character, which PostgreSQL cannot "
                "store; remove it"
            )
        if len(_utf8(name, "a header name")) > MAX_HEADER_NAME_BYTES:
            raise InvalidHeaderError(
                f"header name {_shown(name)} is over {MAX_HEADER_NAME_BYTES} bytes; "
                "use a shorter name"
            )
        _utf8(value, f"header {_shown(name)}")
        checked[name] = value
    return checked


def validate_content_type(content_type: object) -> None:
    """Raise InvalidContentTypeError unless ``content_type`` is a short printable media type."""
    if not isinstance(content_type, str):
        raise InvalidContentTypeError(
            f"content_type must be a str, got {type(content_type).__name__}"
        )
    if len(content_type) > MAX_CONTENT_TYPE_CHARS:
        raise InvalidContentTypeError(
            f"content_type is {len(content_type)} characters long, over the limit of "
            f"{MAX_CONTENT_TYPE_CHARS}; use a media type such as 'application/xml'"
        )
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise InvalidContentTypeError(
            f"content_type {_shown(content_type)} is not a media type (type/subtype with "
            "optional parameters, printable ASCII only); e.g. 'application/xml'"
        )


def validate_delay(delay: object) -> timedelta:
    """The delay as a timedelta; raise InvalidDelayError unless it is a finite duration
    from zero to :data:`MAX_DELAY`."""
    if delay is None:
        return timedelta(0)
    if isinstance(delay, timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, int | float) and not isinstance(delay, bool):
        seconds = float(delay)
    else:
        raise InvalidDelayError(
            f"delay must be a timedelta or a number of seconds, got {type(delay).__name__}"
        )
    if math.isnan(seconds):
        raise InvalidDelayError("delay is NaN; pass a number of seconds or a timedelta")
    if seconds < 0:
        raise InvalidDelayError("delay is negative; pass 0 or a positive duration")
    if seconds > MAX_DELAY.total_seconds():
        raise InvalidDelayError(
            f"delay is over the maximum of {MAX_DELAY.days} days; schedule such messages "
            "yourself (e.g. a job that enqueues them when due)"
        )
    return delay if isinstance(delay, timedelta) else timedelta(seconds=seconds)


def message_size(body: bytes, headers: Mapping[str, str]) -> int:
    """What counts toward ``max_payload_bytes``: the body plus every header name and value
    (UTF-8 bytes)."""
    return len(body) + sum(
        len(name.encode(errors="surrogatepass")) + len(value.encode(errors="surrogatepass"))
        for name, value in headers.items()
    )


def check_message(message: Message, max_payload_bytes: int) -> None:
    """Raise an InvalidMessageError subclass unless ``message`` can be written as it is.

    Checks what :meth:`Message.create` checks of the finished envelope, so messages built
    with the constructor are held to the same rules before they reach the database.
    """
    if not isinstance(message.id, uuid.UUID):
        raise InvalidMessageError(
            f"message id must be a uuid.UUID, got {type(message.id).__name__}; "
            "build messages with Message.create"
        )
    validate_topic(message.topic)
    validate_key(message.key)
    validate_headers(message.headers)
    validate_content_type(message.content_type)
    if not isinstance(message.body, bytes):
        raise InvalidMessageError(
            f"body must be bytes, got {type(message.body).__name__}; "
            "build messages with Message.create"
        )
    validate_delay(message.available_at - message.created_at)
    size = message_size(message.body, message.headers)
    if size > max_payload_bytes:
        raise PayloadTooLargeError(size, max_payload_bytes)


def encode_payload(
    payload: Any, content_type: str | None = None, json_default: JsonDefault | None = None
) -> tuple[bytes, str]:
    """Encode ``payload`` for the wire; return the bytes and their content type.

    ``bytes`` are sent as they are (``application/octet-stream`` unless ``content_type``
    says otherwise); anything else is sent as compact JSON by
    :func:`~postroom.encoding.encode_json` (with ``json_default`` for types it does not
    know), nested at most :data:`MAX_PAYLOAD_DEPTH` deep.
    """
    if content_type is not None:
        validate_content_type(content_type)
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), content_type or OCTET_STREAM
    if content_type is not None and not _is_json_type(content_type):
        raise InvalidMessageError(
            f"content_type {content_type!r} needs a bytes payload; encode the payload yourself "
            "or leave content_type out to send JSON"
        )
    try:
        text = encode_json(payload, json_default)
    except RecursionError:
        raise _too_deep() from None
    if _json_depth(text) > MAX_PAYLOAD_DEPTH:
        raise _too_deep()
    return _utf8(text, "the payload"), content_type or JSON


def _too_deep() -> PayloadTooDeepError:
    return PayloadTooDeepError(
        f"payload nests lists and objects more than {MAX_PAYLOAD_DEPTH} levels deep; "
        "flatten it (consumers in other languages and Python's own decoder refuse deeper JSON)"
    )


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (strings skipped)."""
    if "[" not in text and "{" not in text:
        return 0
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; UnencodableTextError (a lone surrogate) names ``what``."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise UnencodableTextError(
            f"{what} contains {exc.object[exc.start : exc.end]!a}, a lone surrogate that "
            "UTF-8 cannot encode; decode your input with errors='replace' or remove it"
        ) from None


def _shown(value: object) -> str:
    """``value`` for an error message: ASCII only, at most 60 characters of it."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_payload(body: bytes, content_type: str) -> Any:
    """Decode a wire body by its content type: JSON to Python values, anything else as bytes."""
    if _is_json_type(content_type):
        return json.loads(body)
    return body


def normalize_id(message_id: str) -> str:
    """A UUID-shaped id in its canonical form (lower case, hyphenated), else unchanged.

    Upper case, braces, ``urn:uuid:`` and unhyphenated spellings of one UUID are one
    message to the inbox, so a producer's spelling cannot make a handler run twice; the
    CLI finds inbox entries and dead letters by the same form.
    """
    shaped = _UUID_SHAPED.fullmatch(message_id)
    return message_id if shaped is None else str(uuid.UUID(shaped["hex"]))


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
