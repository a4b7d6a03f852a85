"""The message envelope: ids, encoding and validation of every part."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from postroom import InvalidMessageError, Message, PayloadTooLargeError
from postroom._uuid7 import uuid7
from postroom.message import HEADER_ID, decode_payload


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
