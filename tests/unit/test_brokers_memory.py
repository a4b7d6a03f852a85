"""The in-memory broker: storage, copies, routing rules, simulated failures."""

from __future__ import annotations

import uuid

import pytest

from postroom.brokers import CONFIRMED, Outcome, Publisher, PublishResult
from postroom.brokers.base import wire_size
from postroom.brokers.memory import MemoryBroker, MemoryPublisher
from postroom.errors import BrokerUnavailableError
from postroom.message import Message


def messages(topic: str, count: int) -> list[Message]:
    return [Message.create(topic, {"n": i}, key=f"k{i % 2}") for i in range(count)]


async def test_publisher_is_a_publisher() -> None:
    assert isinstance(MemoryBroker().publisher(), Publisher)


async def test_messages_are_kept_per_topic_in_publish_order() -> None:
    broker = MemoryBroker()
    publisher = broker.publisher()
    orders, mails = messages("orders", 3), messages("mails", 2)

    assert await publisher.publish([orders[0], mails[0], orders[1]]) == [CONFIRMED] * 3
    assert await publisher.publish([mails[1], orders[2]]) == [CONFIRMED] * 2

    assert broker.messages("orders") == orders
    assert broker.messages("mails") == mails
    assert broker.messages() == [orders[0], mails[0], orders[1], mails[1], orders[2]]
    assert broker.topics() == ["orders", "mails"]
    broker.clear()
    assert broker.messages() == []


async def test_stored_messages_do_not_share_headers_with_callers() -> None:
    broker = MemoryBroker()
    headers = {"trace-id": "t-1"}
    message = Message.create("orders", {"a": [1]}, headers=headers)
    await broker.publisher().publish([message])

    assert isinstance(message.headers, dict)
    message.headers["trace-id"] = "changed by the caller"
    seen = broker.messages()[0]
    assert isinstance(seen.headers, dict)
    seen.headers["trace-id"] = "changed by a reader"

    assert broker.messages()[0].headers == {"trace-id": "t-1"}


async def test_unroutable_topic_is_rejected_and_others_confirmed() -> None:
    broker = MemoryBroker(unroutable=["lost"])
    good, lost = messages("orders", 2), Message.create("lost", {})

    results = await broker.publisher().publish([good[0], lost, good[1]])

    assert results[0] == results[2] == CONFIRMED
    assert results[1].outcome is Outcome.REJECTED
    assert "'lost'" in (results[1].error or "")
    assert broker.messages() == good
    broker.make_routable("lost")
    assert await broker.publisher().publish([lost]) == [CONFIRMED]
    broker.make_unroutable("orders")
    assert (await broker.publisher().publish(good[:1]))[0].outcome is Outcome.REJECTED


async def test_outage_makes_connect_raise_and_publish_unavailable() -> None:
    broker = MemoryBroker()
    publisher = broker.publisher()
    await publisher.connect()

    with broker.outage("maintenance window"):
        assert not broker.available
        with pytest.raises(BrokerUnavailableError, match="maintenance window"):
            await broker.publisher().connect()
        results = await publisher.publish(messages("orders", 2))
        assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 2
        assert results[0].error == "maintenance window"

    assert broker.available
    assert await publisher.publish(messages("orders", 2)) == [CONFIRMED] * 2
    assert len(broker.messages()) == 2


async def test_specific_message_fails_the_given_number_of_times() -> None:
    broker = MemoryBroker()
    publisher = broker.publisher()
    flaky, poison, fine = messages("orders", 3)
    broker.fail_message(flaky.id, outcome=Outcome.UNAVAILABLE, error="hiccup", times=2)
    broker.fail_message(str(poison.id), error="bad apple")

    for _ in range(2):
        results = await publisher.publish([flaky, poison, fine])
        assert results[0] == PublishResult(Outcome.UNAVAILABLE, "hiccup")
        assert results[1].outcome is Outcome.REJECTED
        assert results[1].error == "bad apple"
    results = await publisher.publish([flaky, poison])

    assert results[0] == CONFIRMED
    assert results[1].outcome is Outcome.REJECTED
    broker.clear_failures()
    assert await publisher.publish([poison]) == [CONFIRMED]
    assert [m.id for m in broker.messages()] == [fine.id, fine.id, flaky.id, poison.id]


def test_fail_message_checks_its_arguments() -> None:
    broker = MemoryBroker()
    with pytest.raises(ValueError, match="REJECTED or"):
        broker.fail_message(uuid.uuid4(), outcome=Outcome.CONFIRMED)
    with pytest.raises(ValueError, match="positive"):
        broker.fail_message(uuid.uuid4(), times=0)


async def test_body_over_the_limit_is_rejected() -> None:
    small = Message.create("t", b"12345")
    broker = MemoryBroker(max_message_bytes=wire_size(small))
    big = Message.create("t", b"123456")
    header = Message.create("t", b"", headers={"h": "x" * 10})

    results = await broker.publisher().publish([small, big, header])

    assert results[0] == CONFIRMED
    for refused in results[1:]:
        assert refused.outcome is Outcome.REJECTED
        assert refused.permanent
        assert "too large for the broker" in (refused.error or "")
    assert f"{wire_size(big)} bytes > limit {wire_size(small)}" in (results[1].error or "")


async def test_named_brokers_are_shared_until_forgotten() -> None:
    name = f"unit-{uuid.uuid4().hex}"
    broker = MemoryBroker.named(name)
    assert MemoryBroker.named(name) is broker
    MemoryBroker.forget(name)
    assert MemoryBroker.named(name) is not broker
    MemoryBroker.forget(name)


async def test_publish_connects_by_itself_and_close_disconnects() -> None:
    publisher = MemoryPublisher(MemoryBroker())
    assert not publisher.connected
    assert await publisher.publish([]) == []
    assert await publisher.publish(messages("t", 1)) == [CONFIRMED]
    assert publisher.connected
    await publisher.close()
    assert not publisher.connected


async def test_dead_letters_are_browsed_found_and_requeued_for_their_consumer_only() -> None:
    from postroom.brokers import DeadLetters, dead_letters_from_url
    from postroom.brokers.memory import MemoryDeadLetters, MemorySubscriber

    MemoryBroker.forget("dead-letters")
    broker = MemoryBroker.named("dead-letters")
    subscriber = MemorySubscriber(broker)
    await subscriber.start("billing", ["orders"])
    sent = messages("orders", 3)
    await broker.publisher().publish(sent)
    for message in sent[:2]:
        await subscriber.deliver(message).dead_letter("no such customer", 5)

    letters = dead_letters_from_url("memory://dead-letters", "billing")
    assert isinstance(letters, MemoryDeadLetters)
    assert isinstance(letters, DeadLetters)
    listing = await letters.browse(1)
    assert (listing.total, [x.id for x in listing.letters]) == (2, [str(sent[0].id)])
    assert listing.letters[0].body == b""
    assert listing.letters[0].payload_bytes == len(sent[0].body)
    found = await letters.find(str(sent[1].id))
    assert found.letter is not None
    assert (found.copies, found.letter.body) == (1, sent[1].body)
    assert (found.letter.error, found.letter.attempts) == ("no such customer", 5)
    assert (await letters.find("nothing")).letter is None

    report = await letters.requeue([found.letter])
    assert [x.id for x in report.requeued] == [str(sent[1].id)]
    assert [x.id for x in (await letters.browse(None)).letters] == [str(sent[0].id)]
    copy = broker.messages("orders")[-1]
    assert copy.id == sent[1].id
    assert copy.headers == {"postroom-for-consumer": "billing"}
    MemoryBroker.forget("dead-letters")


async def test_a_fresh_subscriber_skips_what_its_consumer_settled() -> None:
    from postroom.brokers.memory import MemorySubscriber

    broker = MemoryBroker()
    sent = messages("orders", 3)
    await broker.publisher().publish(sent)
    first = MemorySubscriber(broker)
    await first.start("billing", ["orders"])
    stream = first.deliveries()
    got = [await anext(stream) for _ in sent]
    await got[0].ack()
    await got[1].dead_letter("no", 1)
    await first.close()

    again = MemorySubscriber(broker)
    await again.start("billing", ["orders"])
    other = MemorySubscriber(broker)
    await other.start("shipping", ["orders"])
    assert (await anext(again.deliveries())).message.id == sent[2].id
    shipping = other.deliveries()
    assert [(await anext(shipping)).message.id for _ in sent] == [m.id for m in sent]
    await again.close()
    await other.close()
