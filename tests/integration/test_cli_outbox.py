"""The operator CLI (`postroom outbox ...`, `postroom inbox ...`) as a subprocess, on real
PostgreSQL, with a real relay in-process publishing to the in-memory broker."""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from postroom import Settings
from postroom.brokers.memory import MemoryBroker
from postroom.cli.app import app
from postroom.message import Message
from postroom.outbox import Outbox
from postroom.relay import Relay
from postroom.schema import Tables
from tests.support.cli import arun_postroom, as_json, run_postroom
from tests.support.relaying import relay_settings, running_relay
from tests.support.waiting import wait_until


def environment(tables: Tables, env: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: a wide terminal and the test's schema, updated by ``env``."""
    return {"COLUMNS": "200", "POSTROOM_SCHEMA": tables.schema or "", **(env or {})}


def cli(
    tables: Tables, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m postroom ARGS`` on the test schema and capture its output."""
    return run_postroom(*args, env=environment(tables, env))


async def acli(tables: Tables, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`cli` in a thread, so an in-process relay keeps running meanwhile."""
    return await arun_postroom(*args, env=environment(tables))


@pytest.fixture
def settings(database_url: str, tables: Tables) -> Settings:
    """Relay settings: short leases, one attempt before a row is dead-lettered."""
    return relay_settings(
        database_url,
        tables,
        relay_poll_interval=0.1,
        relay_backoff_initial=0.1,
        relay_backoff_max=0.2,
        relay_max_attempts=1,
    )


def write(engine: Engine, outbox: Outbox, *messages: Message) -> list[Message]:
    with Session(engine) as session:
        written = outbox.enqueue_many(session, list(messages))
        session.commit()
    return written


def row(engine: Engine, tables: Tables, message_id: uuid.UUID) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(tables.outbox).where(tables.outbox.c.id == message_id)
        ).one()


def ids_in_outbox(engine: Engine, tables: Tables) -> set[uuid.UUID]:
    with engine.connect() as connection:
        return set(connection.execute(select(tables.outbox.c.id)).scalars())


async def test_dead_row_is_found_inspected_retried_and_published(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    broker = MemoryBroker(unroutable=["orders.lost"])
    lost, fine = write(
        engine,
        outbox,
        outbox.message("orders.lost", {"order": 7, "total": "12.50"}, key="o-7"),
        outbox.message("orders.ok", {"order": 8}, key="o-8"),
    )
    async with running_relay(Relay(settings, broker.publisher())):
        await wait_until(lambda: row(engine, tables, lost.id).status == "dead", within=15)
        await wait_until(lambda: row(engine, tables, fine.id).status == "published", within=15)

    found = as_json(await acli(tables, "outbox", "ls", "--state", "dead", "--json"))
    assert found["matched"] == 1
    assert [r["id"] for r in found["items"]] == [str(lost.id)]
    assert found["items"][0]["state"] == "dead"
    assert "unroutable" in found["items"][0]["last_error"]
    listed = await acli(tables, "outbox", "ls", "--state", "dead", "--error", "UNROUTABLE")
    assert listed.returncode == 0, listed.stderr
    assert str(lost.id) in listed.stdout
    assert str(fine.id) not in listed.stdout
    assert "1 of 1 matching rows" in listed.stdout

    shown = await acli(tables, "outbox", "show", str(lost.id))
    assert shown.returncode == 0, shown.stderr
    for fact in ("dead", "orders.lost", "o-7", '"total": "12.50"', "unroutable", "retry"):
        assert fact in shown.stdout
    detail = as_json(await acli(tables, "outbox", "show", str(lost.id), "--json"))
    assert detail["payload"] == {"order": 7, "total": "12.50"}
    assert detail["attempts"] == 1
    assert detail["state"] == "dead"
    assert detail["dead_lettered_at"] is not None

    dry = await acli(tables, "outbox", "retry", str(lost.id), "--dry-run")
    assert dry.returncode == 0
    assert "would retry 1" in dry.stdout
    assert row(engine, tables, lost.id).status == "dead"

    broker.make_routable("orders.lost")
    retried = as_json(await acli(tables, "outbox", "retry", str(lost.id), "--yes", "--json"))
    assert (retried["matched"], retried["changed"]) == (1, 1)
    after = row(engine, tables, lost.id)
    assert (after.status, after.attempts, after.dead_lettered_at) == ("pending", 0, None)

    async with running_relay(Relay(settings, broker.publisher())):
        await wait_until(lambda: row(engine, tables, lost.id).status == "published", within=15)
    assert [m.id for m in broker.messages("orders.lost")] == [lost.id]

    again = await acli(tables, "outbox", "retry", "--topic", "orders.lost", "--yes")
    assert again.returncode == 0
    assert "No dead or backing-off rows match (topic orders.lost)" in again.stdout


async def test_replay_redelivers_with_the_same_id_and_the_inbox_skips_it(
    settings: Settings, engine: Engine, outbox: Outbox, tables: Tables, database_url: str
) -> None:
    from postroom.consumer import Consumer
    from postroom.testing import Disposition, deliver

    handled: list[uuid.UUID] = []
    consumer = Consumer("billing", settings=settings)

    @consumer.handler("orders.created")
    async def charge(message: Message, session: Any) -> None:
        handled.append(message.id)

    broker = MemoryBroker()
    (sent,) = write(engine, outbox, outbox.message("orders.created", {"order": 1}, key="o-1"))
    async with running_relay(Relay(settings, broker.publisher())):
        await wait_until(lambda: len(broker.messages()) == 1, within=15)
        await wait_until(lambda: row(engine, tables, sent.id).status == "published", within=15)
        first = await deliver(consumer, broker.messages()[0], database_url=database_url)
        assert first.disposition is Disposition.HANDLED

        replayed = await acli(tables, "outbox", "replay", str(sent.id), "--yes")
        assert replayed.returncode == 0, replayed.stderr
        assert "Replaying 1 messages" in replayed.stdout
        assert "consumers with an inbox skip the ones they already handled" in replayed.stdout
        await wait_until(lambda: len(broker.messages()) == 2, within=15)
        await wait_until(lambda: row(engine, tables, sent.id).status == "published", within=15)

    copy = broker.messages()[1]
    assert copy.id == sent.id
    second = await deliver(consumer, copy, database_url=database_url)
    assert second.disposition is Disposition.DUPLICATE
    assert handled == [sent.id]

    entries = as_json(await acli(tables, "inbox", "ls", "--consumer", "billing", "--json"))
    assert [e["message_id"] for e in entries["items"]] == [str(sent.id)]
    forgot = as_json(
        await acli(tables, "inbox", "forget", "-c", "billing", str(sent.id), "--yes", "--json")
    )
    assert forgot["changed"] == 1
    third = await deliver(consumer, copy, database_url=database_url)
    assert third.disposition is Disposition.HANDLED
    assert handled == [sent.id, sent.id]

    gone = str(uuid.uuid4())
    missing = await acli(tables, "outbox", "replay", gone, "--yes")
    assert missing.returncode == 3
    assert gone in missing.stderr
    assert "retention" in missing.stderr
    assert "Traceback" not in missing.stderr


def backdate(engine: Engine, tables: Tables, statement: str, **params: Any) -> None:
    table = f'"{tables.schema}"."{tables.outbox.name}"'
    with engine.begin() as connection:
        connection.execute(text(statement.format(outbox=table)), params)


def test_purge_dry_run_changes_nothing_and_then_removes_exactly_the_matching_rows(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    written = write(engine, outbox, *(outbox.message("t", {"n": i}, key=f"k{i}") for i in range(7)))
    old_published = [m.id for m in written[:3]]
    new_published = [m.id for m in written[3:5]]
    old_dead, pending = written[5].id, written[6].id
    set_published = (
        "UPDATE {outbox} SET status = 'published', "
        "published_at = now() - CAST(:age AS interval) WHERE id = ANY(:ids)"
    )
    backdate(engine, tables, set_published, age="2 hours", ids=old_published)
    backdate(engine, tables, set_published, age="10 minutes", ids=new_published)
    backdate(
        engine,
        tables,
        "UPDATE {outbox} SET status = 'dead', dead_lettered_at = now() - interval '2 hours', "
        "attempts = 3, last_error = 'too large' WHERE id = :id",
        id=old_dead,
    )
    everything = ids_in_outbox(engine, tables)

    dry = as_json(cli(tables, "outbox", "purge", "--older-than", "1h", "--dry-run", "--json"))
    assert (dry["dry_run"], dry["matched"], dry["changed"]) == (True, 3, 0)
    assert {r["id"] for r in dry["items"]} == {str(i) for i in old_published}
    table_dry = cli(tables, "outbox", "purge", "--older-than", "1h", "--dry-run")
    assert "would delete 3 published rows; nothing changed" in table_dry.stdout
    assert ids_in_outbox(engine, tables) == everything

    refused = cli(tables, "outbox", "purge", "--older-than", "1h")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert ids_in_outbox(engine, tables) == everything

    purged = cli(tables, "outbox", "purge", "--older-than", "1h", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert "Deleted 3 rows." in purged.stdout
    assert ids_in_outbox(engine, tables) == everything - set(old_published)

    dead = as_json(
        cli(tables, "outbox", "purge", "--older-than", "1h", "-s", "dead", "--yes", "--json")
    )
    assert dead["changed"] == 1
    assert ids_in_outbox(engine, tables) == {*new_published, pending}

    nothing = cli(tables, "outbox", "purge", "--older-than", "1h", "--yes")
    assert nothing.returncode == 0
    assert "Nothing to do" in nothing.stdout


def test_status_json_and_table_carry_the_same_facts_and_probe_the_backlog(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    written = write(
        engine,
        outbox,
        *(outbox.message("orders", {"n": i}, key=f"k{i}") for i in range(3)),
        outbox.message("invoices", {"n": 9}, key="x"),
    )
    backdate(
        engine,
        tables,
        "UPDATE {outbox} SET status = 'dead', dead_lettered_at = now(), attempts = 1, "
        "last_error = 'nack' WHERE id = :id",
        id=written[3].id,
    )
    backdate(
        engine,
        tables,
        "UPDATE {outbox} SET available_at = now() - interval '10 minutes' WHERE id = :id",
        id=written[0].id,
    )
    status = as_json(cli(tables, "outbox", "status", "--json"))
    assert status["counts"] == {
        "pending": 3,
        "backing_off": 0,
        "delayed": 0,
        "published": 0,
        "dead": 1,
    }
    assert status["oldest_pending"]["age_seconds"] >= 600
    assert {t["topic"]: (t["pending"], t["dead"]) for t in status["topics"]} == {
        "orders": (3, 0),
        "invoices": (0, 1),
    }
    assert status["partitions"][0]["owner"] is None
    assert sum(len(p["partitions"]) for p in status["partitions"]) == 64
    assert status["pending_without_live_relay"] == 3

    table = cli(tables, "outbox", "status")
    assert table.returncode == 0, table.stderr
    assert "pending    3 (0 backing off" in table.stdout
    assert "dead       1" in table.stdout
    assert "waited 10m" in table.stdout
    assert "(nobody)" in table.stdout
    assert "0-63" in table.stdout
    assert "No relay is registered" in table.stdout

    listed = as_json(cli(tables, "outbox", "ls", "--json", "--newest", "--limit", "2"))
    assert (listed["matched"], listed["count"]) == (4, 2)
    assert [r["id"] for r in listed["items"]] == [str(written[3].id), str(written[2].id)]
    shown = cli(tables, "outbox", "ls", "--newest", "--limit", "2")
    assert "2 of 4 matching rows, newest first; raise --limit" in shown.stdout
    for r in listed["items"]:
        assert r["id"] in shown.stdout
        assert r["state"] in shown.stdout

    assert cli(tables, "outbox", "status", "--fail-if-older-than", "1h").returncode == 0
    probe = cli(tables, "outbox", "status", "--fail-if-older-than", "5m")
    assert probe.returncode == 1
    assert "longer than 5m" in probe.stderr
    bad = cli(tables, "outbox", "status", "--fail-if-older-than", "five minutes")
    assert bad.returncode == 2
    assert "is not a duration" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_errors_are_sentences(tables: Tables) -> None:
    unreachable = cli(
        tables,
        "outbox",
        "status",
        env={"POSTROOM_DATABASE_URL": "postgresql://postgres:s3cret-pw@127.0.0.1:1/test"},
    )
    assert unreachable.returncode == 3
    assert "cannot reach PostgreSQL" in unreachable.stderr
    assert "s3cret-pw" not in unreachable.stderr + unreachable.stdout
    assert "Traceback" not in unreachable.stderr

    missing = cli(tables, "outbox", "ls", env={"POSTROOM_SCHEMA": "pr_test_absent"})
    assert missing.returncode == 3
    assert "postroom db upgrade" in missing.stderr

    unknown = str(uuid.uuid4())
    shown = cli(tables, "outbox", "show", unknown)
    assert shown.returncode == 3
    assert f"message {unknown} is not in the outbox" in shown.stderr
    malformed = cli(tables, "outbox", "show", "42")
    assert malformed.returncode == 2
    assert "is not a message id" in malformed.stderr
    unselected = cli(tables, "outbox", "retry", "--yes")
    assert unselected.returncode == 2
    assert "--all" in unselected.stderr
    retry_unknown = cli(tables, "outbox", "retry", unknown, "--yes")
    assert retry_unknown.returncode == 3
    assert unknown in retry_unknown.stderr


def test_inbox_ls_forget_and_purge(engine: Engine, tables: Tables) -> None:
    inbox = f'"{tables.schema}"."{tables.inbox.name}"'
    with engine.begin() as connection:
        connection.execute(
            text(
                f"INSERT INTO {inbox} (consumer, message_id, processed_at) VALUES "
                "('billing', 'm1', now() - interval '10 days'), "
                "('billing', 'm2', now() - interval '1 hour'), "
                "('billing', 'm3', now()), ('shipping', 'm1', now() - interval '10 days')"
            )
        )
    summary = as_json(cli(tables, "inbox", "ls", "--json"))
    assert {c["consumer"]: c["entries"] for c in summary["items"]} == {
        "billing": 3,
        "shipping": 1,
    }
    table = cli(tables, "inbox", "ls")
    assert "billing" in table.stdout
    assert "shipping" in table.stdout

    entries = as_json(cli(tables, "inbox", "ls", "-c", "billing", "--json"))
    assert [e["message_id"] for e in entries["items"]] == ["m3", "m2", "m1"]

    dry = as_json(
        cli(
            tables, "inbox", "forget", "-c", "billing", "--older-than", "30m", "--dry-run", "--json"
        )
    )
    assert (dry["matched"], dry["changed"]) == (2, 0)
    assert as_json(cli(tables, "inbox", "ls", "--json"))["items"][0]["entries"] == 3

    unknown = cli(tables, "inbox", "forget", "-c", "billing", "nope", "--yes")
    assert unknown.returncode == 3
    assert "consumer 'billing' has no inbox entry for message id nope" in unknown.stderr
    nothing = cli(tables, "inbox", "forget", "-c", "billing", "m3", "--older-than", "1d", "--yes")
    assert nothing.returncode == 0
    assert "No inbox entries match" in nothing.stdout

    purged = cli(tables, "inbox", "purge", "--older-than", "7d", "--yes")
    assert purged.returncode == 0
    assert "Deleted 2 inbox entries." in purged.stdout
    left = as_json(cli(tables, "inbox", "ls", "-c", "billing", "--json"))
    assert [e["message_id"] for e in left["items"]] == ["m3", "m2"]


COMMANDS = [
    ("outbox", "status"),
    ("outbox", "ls"),
    ("outbox", "show"),
    ("outbox", "retry"),
    ("outbox", "replay"),
    ("outbox", "purge"),
    ("inbox", "ls"),
    ("inbox", "forget"),
    ("inbox", "purge"),
]


def test_help_reads_well(tables: Tables) -> None:
    root = cli(tables, "--help")
    assert root.returncode == 0
    assert "outbox" in root.stdout
    assert "inbox" in root.stdout
    # The command tree in this process: help text is the same as in a process of its own.
    runner = CliRunner()
    for group in ("outbox", "inbox"):
        assert runner.invoke(app, [group, "--help"]).exit_code == 0
    for command in COMMANDS:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "POSTROOM_DATABASE_URL" in result.stdout
        if command[1] in {"retry", "replay", "purge", "forget"}:
            for flag in ("--dry-run", "--yes", "--json", "POSTROOM_YES"):
                assert flag in result.stdout, (command, flag)


# Regression tests from the review of the data-changing commands.


def test_an_empty_consumer_name_never_widens_inbox_commands(
    database_url: str, engine: Engine, tables: Tables
) -> None:
    with engine.begin() as connection:
        connection.execute(
            tables.inbox.insert(),
            [
                {"consumer": "billing", "message_id": "m1"},
                {"consumer": "shipping", "message_id": "m1"},
            ],
        )
    for command in (["forget", "-c", "", "m1"], ["purge", "-c", "", "--older-than", "0s"]):
        result = cli(
            tables, "inbox", *command, "--yes", env={"POSTROOM_DATABASE_URL": database_url}
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--consumer is empty" in result.stderr
    with engine.connect() as connection:
        assert len(connection.execute(tables.inbox.select()).all()) == 2


def one_row(cursor: Any) -> tuple[Any, ...]:
    """The row a statement that always answers with one row answered with."""
    row = cursor.fetchone()
    assert row is not None, "the statement answered with no row"
    return tuple(row)


def test_a_change_never_takes_a_row_twice_in_one_run(
    conninfo: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    """The batches walk a cursor: rows the relay publishes again meanwhile are not replayed
    a second time (the review saw 53,500 publishes for 50,000 replayed rows)."""
    import psycopg

    from postroom.schema import operations_sql

    with Session(engine) as session:
        outbox.enqueue_many(session, [outbox.message("t", i) for i in range(5)])
        session.commit()
    with engine.begin() as connection:
        connection.execute(
            tables.outbox.update().values(status="published", published_at=text("now()"))
        )
    statement = operations_sql.replay_batch_sql(tables)
    params: dict[str, Any] = dict.fromkeys(operations_sql.OUTBOX_FILTER_PARAMETERS)
    params.update({"limit": 2, "channel": "unused", "after": 0})
    with psycopg.connect(conninfo, autocommit=True) as connection:
        (params["upto"],) = one_row(connection.execute(operations_sql.max_position_sql(tables)))
        replayed = []
        while True:
            count, last, _ = one_row(connection.execute(statement, params))
            if count == 0:
                break
            replayed.append(count)
            params["after"] = last
            # The relay publishes the replayed rows again at once.
            connection.execute(
                f"UPDATE \"{tables.schema}\".outbox SET status = 'published', "
                "published_at = now() WHERE status = 'pending'"
            )
    assert replayed == [2, 2, 1]
