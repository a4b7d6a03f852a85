"""The message envelope: ids, encoding and validation of every part."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest

from postroom import InvalidMessageError, Message, PayloadTooLargeError
from postroom._uuid7 import uuid7
from postroom.errors import (
    InvalidContentTypeError,
    InvalidDelayError,
    InvalidHeaderError,
    InvalidKeyError,
    InvalidTopicError,
    PayloadTooDeepError,
    UnencodableTextError,
)
from postroom.message import (
    HEADER_ID,
    MAX_DELAY,
    MAX_PAYLOAD_DEPTH,
    check_message,
    decode_payload,
)


def test_uuid7_has_version_7_and_rfc_variant() -> None:
    value = uuid7()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_uuid7_sorts_in_creation_order_even_within_a_millisecond() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_json_payload_is_encoded_compactly_and_typed() -> None:
    message = Message.create("orders.created", {"id": 7, "name": "Zoë"}, key="order-7")
    assert message.content_type == "application/json"
    assert message.body == '{"id":7,"name":"Zoë"}'.encode()
    assert decode_payload(message.body, message.content_type) == {"id": 7, "name": "Zoë"}
    assert message.id.version == 7
    assert message.available_at == message.created_at


def test_bytes_payload_is_sent_as_is() -> None:
    message = Message.create("files", b"\x00\xff")
    assert message.content_type == "application/octet-stream"
    assert message.body == b"\x00\xff"


def test_bytes_with_an_explicit_content_type() -> None:
    message = Message.create("files", b"<a/>", content_type="application/xml")
    assert message.content_type == "application/xml"


def test_content_type_for_a_non_bytes_payload_must_be_json() -> None:
    with pytest.raises(InvalidMessageError, match="needs a bytes payload"):
        Message.create("t", {"a": 1}, content_type="text/plain")
    assert Message.create("t", {"a": 1}, content_type="application/cloudevents+json").body


def test_given_message_id_is_kept() -> None:
    given = uuid.uuid4()
    assert Message.create("t", 1, message_id=given).id == given
    assert Message.create("t", 1, message_id=str(given)).id == given


def test_delay_sets_available_at() -> None:
    message = Message.create("t", 1, delay=timedelta(minutes=5))
    assert message.available_at - message.created_at == timedelta(minutes=5)
    assert Message.create("t", 1, delay=2.5).delay_seconds == 2.5


def test_wire_headers_carry_the_envelope_and_user_headers() -> None:
    message = Message.create("t", 1, key="k", headers={"trace": "abc"})
    wire = message.wire_headers()
    assert wire["trace"] == "abc"
    assert wire[HEADER_ID] == str(message.id)
    assert wire["postroom-key"] == "k"
    assert wire["postroom-content-type"] == "application/json"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topic": ""}, "topic is empty"),
        ({"topic": "x" * 250}, "limit is 249"),
        ({"topic": "has space"}, "may only contain"),
        ({"topic": ".."}, "may only contain"),
        ({"topic": 5}, "topic must be a str"),
        ({"key": ""}, "pass key=None"),
        ({"key": 12}, "key must be a str"),
        ({"key": "a\x00b"}, "NUL"),
        ({"key": "k" * 1025}, "longer than 1024 bytes"),
        ({"headers": {"n": 1}}, "values must be str"),
        ({"headers": {1: "v"}}, "must be a non-empty str"),
        ({"headers": {"": "v"}}, "must be a non-empty str"),
        ({"headers": {"Postroom-Id": "v"}}, "reserved prefix"),
        ({"headers": {"n": "a\x00"}}, "NUL"),
        ({"headers": ["n", "v"]}, "must be a mapping"),
        ({"payload": {1, 2}}, "not JSON-serializable"),
        ({"payload": object()}, "not JSON-serializable"),
        ({"payload": float("nan")}, "not JSON-serializable"),
        ({"delay": -1}, "negative"),
        ({"delay": "soon"}, "delay must be"),
        ({"message_id": "not-a-uuid"}, "not a UUID"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"topic": "t", "payload": {"ok": True}} | kwargs
    topic = arguments.pop("topic")
    payload = arguments.pop("payload")
    with pytest.raises(InvalidMessageError, match=match):
        Message.create(topic, payload, **arguments)  # type: ignore[arg-type]


def test_payload_over_the_limit_is_refused_and_names_the_setting() -> None:
    with pytest.raises(PayloadTooLargeError, match="POSTROOM_MAX_PAYLOAD_BYTES") as caught:
        Message.create("t", b"x" * 101, max_payload_bytes=100)
    assert (caught.value.size, caught.value.limit) == (101, 100)
    big_json = {"data": "y" * (1024 * 1024)}
    with pytest.raises(PayloadTooLargeError):
        Message.create("t", big_json)
    assert len(json.dumps(big_json)) > 1024 * 1024


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


HOSTILE: list[tuple[str, dict[str, object], type[InvalidMessageError], str]] = [
    ("100k-deep payload", {"payload": _nested(100_000)}, PayloadTooDeepError, "levels deep"),
    ("101-deep payload", {"payload": _nested(101)}, PayloadTooDeepError, "flatten"),
    ("surrogate in payload", {"payload": {"a": "\ud800"}}, UnencodableTextError, "surrogate"),
    (
        "surrogate in a key of the payload",
        {"payload": {"\udfff": 1}},
        UnencodableTextError,
        "payload",
    ),
    ("surrogate in key", {"key": "k\udc00"}, UnencodableTextError, "key contains"),
    ("surrogate in topic", {"topic": "t\ud800"}, InvalidTopicError, "may only contain"),
    ("NUL in topic", {"topic": "t\x00"}, InvalidTopicError, "may only contain"),
    ("surrogate in header value", {"headers": {"h": "\ud800"}}, UnencodableTextError, "'h'"),
    ("surrogate in header name", {"headers": {"\ud800": "v"}}, UnencodableTextError, "name"),
    ("NUL in header name", {"headers": {"a\x00": "v"}}, InvalidHeaderError, "NUL"),
    ("header value not str", {"headers": {"h": b"v"}}, InvalidHeaderError, "must be str"),
    (
        "too many headers",
        {"headers": {f"h{i}": "v" for i in range(101)}},
        InvalidHeaderError,
        "101",
    ),
    ("infinite delay", {"delay": float("inf")}, InvalidDelayError, "365 days"),
    ("NaN delay", {"delay": float("nan")}, InvalidDelayError, "NaN"),
    ("huge delay", {"delay": 1e300}, InvalidDelayError, "365 days"),
    ("huge timedelta", {"delay": timedelta(days=999_999_999)}, InvalidDelayError, "maximum"),
    ("negative timedelta", {"delay": timedelta(seconds=-1)}, InvalidDelayError, "negative"),
    ("bool delay", {"delay": True}, InvalidDelayError, "delay must be"),
    (
        "NUL content type",
        {"content_type": "application/json\x00"},
        InvalidContentTypeError,
        "media type",
    ),
    (
        "long content type",
        {"payload": b"x", "content_type": "a/" + "b" * 300},
        InvalidContentTypeError,
        "255",
    ),
    ("content type not str", {"content_type": 5}, InvalidContentTypeError, "must be a str"),
    (
        "content type no slash",
        {"payload": b"x", "content_type": "xml"},
        InvalidContentTypeError,
        "media type",
    ),
    (
        "newline in content type",
        {"content_type": "application/json\r\nX: y"},
        InvalidContentTypeError,
        "media type",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_values_raise_a_typed_error_with_what_to_do(
    kwargs: dict[str, object], error: type[InvalidMessageError], match: str
) -> None:
    arguments: dict[str, object] = {"topic": "t", "payload": {"ok": True}} | kwargs
    topic = arguments.pop("topic")
    payload = arguments.pop("payload")
    with pytest.raises(error, match=match) as caught:
        Message.create(topic, payload, **arguments)  # type: ignore[arg-type]
    assert isinstance(caught.value, InvalidMessageError)
    assert "\ud800" not in str(caught.value)
    assert "\x00" not in str(caught.value)


def test_the_deepest_accepted_payload_and_the_longest_delay() -> None:
    assert Message.create("t", _nested(MAX_PAYLOAD_DEPTH)).payload == _nested(MAX_PAYLOAD_DEPTH)
    assert Message.create("t", {"s": "[[[[" * 200}).payload == {"s": "[[[[" * 200}
    assert Message.create("t", 1, delay=MAX_DELAY).delay_seconds == MAX_DELAY.total_seconds()
    assert Message.create("t", b"x", content_type="text/plain; charset=utf-8").body == b"x"


def test_headers_count_toward_the_message_size_limit() -> None:
    headers = {"h": "v" * 60}
    assert Message.create("t", b"x" * 39, headers=headers, max_payload_bytes=100).body
    with pytest.raises(PayloadTooLargeError, match="payload and headers") as caught:
        Message.create("t", b"x" * 40, headers=headers, max_payload_bytes=100)
    assert caught.value.size == 101


def test_check_message_holds_hand_built_messages_to_the_same_rules() -> None:
    good = Message.create("t", {"a": 1})
    check_message(good, 100)
    for bad, error in [
        (replace(good, content_type="application/json\x00"), InvalidContentTypeError),
        (replace(good, headers={"h": "\ud800"}), UnencodableTextError),
        (replace(good, available_at=good.created_at + timedelta(days=400)), InvalidDelayError),
        (replace(good, key="\x00"), InvalidKeyError),
        (replace(good, body=b"x" * 101), PayloadTooLargeError),
    ]:
        with pytest.raises(error):
            check_message(bad, 100)
