"""Ids as operators see them: the postroom-id of the logs (in any UUID spelling) finds outbox
rows, inbox entries and dead letters; the AMQP message_id finds RabbitMQ dead letters of other
producers; ids and consumer names that cannot exist are refused instead of passing silently."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables
from tests.support.cli import arun_postroom, as_json, run_postroom
from tests.support.consuming import KAFKA_GROUP_SETTINGS, unique
from tests.support.deadletters import kafka_dead_letter, rabbitmq_dead_letter
from tests.support.readback import delete_consumer_queues, drain_queue
from tests.support.services import AMQP_URL, KAFKA_URL, kafka_available, rabbitmq_available

ID = uuid.UUID("0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8b")
#: Spellings of ID an operator may paste: from another tool, a log, a URN.
SPELLINGS = [
    str(ID).upper(),
    "{" + str(ID) + "}",
    f"urn:uuid:{ID}",
    ID.hex,
    f"  {ID}  ",
]
#: Two of them for commands that take one id per run (the normalising itself is proved for
#: every spelling in tests/unit/test_hardening_ids.py).
SOME_SPELLINGS = [SPELLINGS[2], SPELLINGS[3]]


def cli(tables: Tables, *args: str) -> subprocess.CompletedProcess[str]:
    """``postroom ARGS`` on the test's schema."""
    return run_postroom(*args, env={"COLUMNS": "200", "POSTROOM_SCHEMA": tables.schema or ""})


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed command (asserting its exit code)."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def inbox_entries(engine: Engine, tables: Tables) -> set[tuple[str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(tables.inbox.select()).all()
    return {(row.consumer, row.message_id) for row in rows}


@pytest.fixture
def inbox(engine: Engine, tables: Tables) -> set[tuple[str, str]]:
    """Entries of two consumers: a postroom id and another producer's id."""
    entries = {("billing", str(ID)), ("billing", "order-17"), ("shipping", str(ID))}
    with engine.begin() as connection:
        connection.execute(
            tables.inbox.insert(), [{"consumer": c, "message_id": m} for c, m in entries]
        )
    return entries


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8", "is not a valid UUID"),  # one digit short
        ("0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8bb", "is not a valid UUID"),  # one too many
        ("   ", "a message id is empty"),
        ("x" * 1001, "is not a message id: ids are at most 1000 characters"),
    ],
)
def test_inbox_forget_refuses_a_malformed_id_and_forgets_nothing(
    engine: Engine, tables: Tables, inbox: set[tuple[str, str]], bad: str, says: str
) -> None:
    line = one_line_error(cli(tables, "inbox", "forget", "-c", "billing", bad, "--yes"), 2)
    assert says in line
    assert inbox_entries(engine, tables) == inbox


def test_inbox_forget_names_the_known_consumers_for_an_unknown_one(
    engine: Engine, tables: Tables, inbox: set[tuple[str, str]]
) -> None:
    line = one_line_error(cli(tables, "inbox", "forget", "-c", "biling", "--all", "--yes"), 3)
    assert "no consumer named 'biling' in the inbox" in line
    assert "known consumers: billing, shipping" in line
    assert inbox_entries(engine, tables) == inbox


def test_inbox_forget_on_an_empty_inbox_says_so(tables: Tables) -> None:
    line = one_line_error(cli(tables, "inbox", "forget", "-c", "billing", "--all", "--yes"), 3)
    assert "no consumer named 'billing'" in line
    assert "the inbox is empty" in line


@pytest.mark.parametrize("name", ["a{x}", "a{x}{", "[/x]", "a b"])
def test_inbox_forget_refuses_a_name_no_consumer_can_have_before_deleting(
    engine: Engine, tables: Tables, inbox: set[tuple[str, str]], name: str
) -> None:
    line = one_line_error(cli(tables, "inbox", "forget", "-c", name, "--all", "--yes"), 2)
    assert f"no consumer can be called {name!r}" in line
    assert "letters, digits" in line
    assert inbox_entries(engine, tables) == inbox


def test_inbox_forget_refuses_ids_the_consumer_never_recorded(
    engine: Engine, tables: Tables, inbox: set[tuple[str, str]]
) -> None:
    other = "0190a5c2-7a4e-7d1c-9f3b-000000000000"
    result = cli(tables, "inbox", "forget", "-c", "billing", str(ID), other, "order-18", "--yes")
    line = one_line_error(result, 3)
    assert f"consumer 'billing' has no inbox entry for message id {other}, order-18" in line
    assert "nothing was forgotten" in line
    assert inbox_entries(engine, tables) == inbox


def test_inbox_forget_finds_the_id_in_any_spelling(
    engine: Engine, tables: Tables, inbox: set[tuple[str, str]]
) -> None:
    # Every spelling names the same entry: two entries match, not one per spelling.
    done = as_json(
        cli(tables, "inbox", "forget", "-c", "billing", *SPELLINGS, "order-17", "--yes", "--json")
    )
    assert (done["matched"], done["changed"]) == (2, 2)
    assert inbox_entries(engine, tables) == {("shipping", str(ID))}


def test_inbox_forget_all_of_a_consumer_leaves_the_others(
    engine: Engine, tables: Tables, inbox: set[tuple[str, str]]
) -> None:
    done = cli(tables, "inbox", "forget", "-c", "billing", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    assert "Forgot 2 inbox entries: billing handles those messages again" in done.stdout
    assert inbox_entries(engine, tables) == {("shipping", str(ID))}


def test_inbox_ls_checks_ids_in_any_spelling(tables: Tables, inbox: set[tuple[str, str]]) -> None:
    listed = as_json(cli(tables, "inbox", "ls", "-c", "shipping", SPELLINGS[0], "--json"))
    assert [e["message_id"] for e in listed["items"]] == [str(ID)]
    bad = cli(tables, "inbox", "ls", "-c", "shipping", "0190a5c2-7a4e-7d1c-9f3b-2c4d5e6f7a8")
    assert "is not a valid UUID" in one_line_error(bad, 2)


@pytest.mark.parametrize("spelling", SOME_SPELLINGS)
def test_outbox_show_takes_the_postroom_id_in_any_spelling(
    engine: Engine, tables: Tables, spelling: str
) -> None:
    with Session(engine) as session, session.begin():
        Outbox(tables).enqueue(session, "orders.placed", {"n": 1}, message_id=ID)
    shown = as_json(cli(tables, "outbox", "show", spelling, "--json"))
    assert shown["id"] == str(ID)
    assert shown["topic"] == "orders.placed"


def test_outbox_show_refuses_what_is_no_uuid(tables: Tables) -> None:
    line = one_line_error(cli(tables, "outbox", "show", "order-17"), 2)
    assert "'order-17' is not a message id" in line


# ----------------------------------------------------------------------------- dead letters


async def dead_letter_cli(broker_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``postroom dead-letter ARGS`` against ``broker_url`` (and nothing else)."""
    env = {"COLUMNS": "250", "POSTROOM_BROKER_URL": broker_url}
    return await arun_postroom("dead-letter", *args, env=env, clean=True)


async def test_rabbitmq_dead_letters_answer_to_postroom_id_and_amqp_message_id() -> None:
    rabbitmq_available()
    name = unique("ids")
    try:
        # Another producer's message whose AMQP message_id differs from its postroom-id
        # (the consumer read ids from the header), and one with only a message_id.
        await rabbitmq_dead_letter(AMQP_URL, name, message_id="amqp-17", postroom_id=str(ID))
        await rabbitmq_dead_letter(AMQP_URL, name, message_id="order-18", postroom_id=None)

        listed = as_json(await dead_letter_cli(AMQP_URL, "ls", "-c", name, "--json"))
        assert sorted(letter["id"] for letter in listed["items"]) == sorted([str(ID), "order-18"])
        for spelling in [*SOME_SPELLINGS, "amqp-17"]:
            shown = as_json(await dead_letter_cli(AMQP_URL, "show", "-c", name, spelling, "--json"))
            assert (shown["id"], shown["amqp_message_id"]) == (str(ID), "amqp-17"), spelling
        table = await dead_letter_cli(AMQP_URL, "show", "-c", name, str(ID))
        assert "AMQP message_id" in table.stdout
        assert "amqp-17" in table.stdout
        only_amqp = as_json(
            await dead_letter_cli(AMQP_URL, "show", "-c", name, "order-18", "--json")
        )
        assert only_amqp["id"] == "order-18"

        # requeue by the AMQP message_id sends that one back, keeping its ids.
        done = as_json(
            await dead_letter_cli(AMQP_URL, "requeue", "-c", name, "amqp-17", "--yes", "--json")
        )
        assert (done["matched"], done["changed"], done["requeued"]) == (1, 1, [str(ID)])
        [copy] = await drain_queue(AMQP_URL, name)
        assert copy.id == "amqp-17"
        assert copy.headers["postroom-id"] == str(ID)
        left = as_json(await dead_letter_cli(AMQP_URL, "ls", "-c", name, "--json"))
        assert [letter["id"] for letter in left["items"]] == ["order-18"]
        missing = await dead_letter_cli(AMQP_URL, "requeue", "-c", name, "amqp-17", "--yes")
        assert "no dead letter 'amqp-17'" in one_line_error(missing, 3)
    finally:
        await delete_consumer_queues(AMQP_URL, name)


async def test_kafka_dead_letters_answer_to_the_postroom_id_in_any_spelling() -> None:
    kafka_available()
    broker_url = f"{KAFKA_URL}?{KAFKA_GROUP_SETTINGS}"
    name = unique("ids")
    topic = unique("orders")
    await kafka_dead_letter(KAFKA_URL, name, Message.create(topic, {"n": 1}, message_id=ID))

    for spelling in SOME_SPELLINGS:
        shown = as_json(await dead_letter_cli(broker_url, "show", "-c", name, spelling, "--json"))
        assert (shown["id"], shown["topic"]) == (str(ID), topic), spelling
    done = as_json(
        await dead_letter_cli(broker_url, "requeue", "-c", name, SPELLINGS[1], "--yes", "--json")
    )
    assert (done["changed"], done["requeued"]) == (1, [str(ID)])
    left = as_json(await dead_letter_cli(broker_url, "ls", "-c", name, "--json"))
    assert left["matched"] == 0
