"""The one routine behind every changing command (select → preview → confirm → apply in
bounded batches), on real PostgreSQL: through the commands that use it, and through a
caller of its own that plugs in its own select, preview and apply."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
import typer
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from postroom.cli.app import app
from postroom.cli.changes import (
    SAMPLE_ROWS,
    Done,
    Mode,
    Selection,
    Wording,
    in_batches,
    run_change,
)
from postroom.cli.output import table
from postroom.outbox import Outbox
from postroom.schema import Tables
from postroom.schema.sql import quote_identifier


def run(tables: Tables, *args: str) -> Result:
    """``postroom ARGS`` in this process, on this test's schema, without a terminal."""
    return CliRunner().invoke(app, list(args), env={"POSTROOM_SCHEMA": tables.schema or ""})


def statuses(engine: Engine, tables: Tables) -> dict[uuid.UUID, str]:
    with engine.connect() as connection:
        rows = connection.execute(tables.outbox.select()).mappings().all()
    return {row["id"]: row["status"] for row in rows}


def dead_rows(engine: Engine, outbox: Outbox, tables: Tables, count: int) -> list[uuid.UUID]:
    with Session(engine) as session:
        written = outbox.enqueue_many(
            session, [outbox.message("orders", {"n": i}, key=f"k{i}") for i in range(count)]
        )
        session.commit()
    with engine.begin() as connection:
        connection.execute(
            tables.outbox.update().values(
                status="dead", attempts=3, last_error="boom", dead_lettered_at=text("now()")
            )
        )
    return [m.id for m in written]


def test_dry_run_previews_the_rows_and_changes_nothing(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    ids = dead_rows(engine, outbox, tables, 3)
    before = statuses(engine, tables)

    shown = run(tables, "outbox", "retry", "--all", "--dry-run")
    assert shown.exit_code == 0, shown.output
    assert "Dead or backing-off rows to retry (3)" in shown.stdout
    assert all(str(i) in shown.stdout for i in ids)
    assert "Dry run: would retry 3 dead or backing-off rows; nothing changed." in shown.stdout

    document = json.loads(run(tables, "outbox", "retry", "--all", "--dry-run", "--json").stdout)
    assert (document["dry_run"], document["matched"], document["changed"]) == (True, 3, 0)
    assert sorted(r["id"] for r in document["items"]) == sorted(map(str, ids))
    assert {r["state"] for r in document["items"]} == {"dead"}

    assert statuses(engine, tables) == before == dict.fromkeys(ids, "dead")


def test_without_a_terminal_yes_is_required_and_nothing_changes(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    ids = dead_rows(engine, outbox, tables, 2)
    refused = run(tables, "outbox", "replay", "--all")  # nothing to replay: exits 0 first
    assert refused.exit_code == 0
    assert "No published rows match" in refused.stdout

    refused = run(tables, "outbox", "retry", "--all")
    assert refused.exit_code == 2
    assert "run it again with --yes" in refused.stderr
    assert statuses(engine, tables) == dict.fromkeys(ids, "dead")

    done = run(tables, "outbox", "retry", "--all", "--yes", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["changed"] == 2
    assert statuses(engine, tables) == dict.fromkeys(ids, "pending")


def test_the_preview_shows_the_first_rows_and_how_many_in_all(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    dead_rows(engine, outbox, tables, SAMPLE_ROWS + 5)
    shown = run(tables, "outbox", "retry", "--topic", "orders", "--dry-run", "--json")
    document = json.loads(shown.stdout)
    assert document["matched"] == SAMPLE_ROWS + 5
    assert len(document["items"]) == SAMPLE_ROWS
    text_run = run(tables, "outbox", "retry", "--topic", "orders", "--dry-run")
    assert f"(first {SAMPLE_ROWS} of {SAMPLE_ROWS + 5})" in text_run.stdout


def test_inbox_forget_previews_confirms_and_deletes_only_what_it_showed(
    engine: Engine, tables: Tables
) -> None:
    with engine.begin() as connection:
        connection.execute(
            tables.inbox.insert(),
            [{"consumer": "billing", "message_id": f"m{i}"} for i in range(3)]
            + [{"consumer": "shipping", "message_id": "m0"}],
        )
    dry = json.loads(
        run(tables, "inbox", "forget", "-c", "billing", "--all", "--dry-run", "--json").stdout
    )
    assert (dry["matched"], dry["changed"]) == (3, 0)
    assert {e["message_id"] for e in dry["items"]} == {"m0", "m1", "m2"}
    assert run(tables, "inbox", "forget", "-c", "billing", "--all").exit_code == 2
    with engine.connect() as connection:
        assert len(connection.execute(tables.inbox.select()).all()) == 4

    done = run(tables, "inbox", "forget", "-c", "billing", "--all", "--yes")
    assert done.exit_code == 0, done.output
    assert "Forgot 3 inbox entries" in done.stdout
    with engine.connect() as connection:
        left = connection.execute(tables.inbox.select()).all()
    assert [(r.consumer, r.message_id) for r in left] == [("shipping", "m0")]


# A caller of its own: what `dead-letter requeue` or any other store would do.


@pytest.fixture
def letters(
    conninfo: str, engine: Engine, tables: Tables
) -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """A table of 12 'letters' and a log of the batches that changed them."""
    schema = quote_identifier(tables.schema or "public")
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {schema}.letters (id int PRIMARY KEY, sent bool)"))
        connection.execute(text(f"CREATE TABLE {schema}.batches (n int, at serial)"))
        connection.execute(
            text(f"INSERT INTO {schema}.letters SELECT g, false FROM generate_series(1, 12) g")
        )
    with psycopg.connect(conninfo, autocommit=True) as connection:
        yield connection, schema


def requeue_letters(
    connection: psycopg.Connection[Any], schema: str, mode: Mode, *, failing: int = 0
) -> None:
    """Send unsent letters in batches of 5, logging each batch; ``failing`` of them fail."""
    unsent = f"SELECT id FROM {schema}.letters WHERE NOT sent ORDER BY id"

    def select() -> Selection[tuple[Any, ...]]:
        rows = connection.execute(unsent).fetchall()
        return Selection(len(rows), rows[:3], {"store": "letters"})

    def preview(title: str, sample: Sequence[tuple[Any, ...]]) -> Any:
        return table(title, ["id"], sample)

    def apply() -> Done:
        statement = f"""
WITH batch AS (SELECT id FROM {schema}.letters WHERE NOT sent ORDER BY id
               LIMIT %(limit)s FOR UPDATE),
changed AS (UPDATE {schema}.letters AS l SET sent = true FROM batch
            WHERE l.id = batch.id RETURNING l.id),
logged AS (INSERT INTO {schema}.batches (n) SELECT count(*) FROM changed)
SELECT count(*) FROM changed"""
        changed = in_batches(connection, statement, {"limit": 5})
        errors = [f"not sent: letter {i}" for i in range(failing)]
        return Done(
            changed,
            [f"Sent {changed} letters."],
            {"failed": failing},
            errors,
            3 if failing else 0,
        )

    run_change(
        Wording(
            "letters", "send", {"sent": "no"}, "from the table", " to nowhere", "No letters left."
        ),
        mode,
        select=select,
        preview=preview,
        item_json=lambda row: {"id": row[0]},
        apply=apply,
    )


def batches(connection: psycopg.Connection[Any], schema: str) -> list[int]:
    return [n for (n,) in connection.execute(f"SELECT n FROM {schema}.batches ORDER BY at")]


def sent(connection: psycopg.Connection[Any], schema: str) -> int:
    row = connection.execute(f"SELECT count(*) FROM {schema}.letters WHERE sent").fetchone()
    assert row is not None
    return int(row[0])


def test_a_caller_of_its_own_gets_bounded_batches_and_the_same_flow(
    letters: tuple[psycopg.Connection[Any], str], capsys: pytest.CaptureFixture[str]
) -> None:
    connection, schema = letters
    requeue_letters(connection, schema, Mode(dry_run=True, yes=False, as_json=False))
    out = capsys.readouterr().out
    assert "Letters to send (first 3 of 12)" in out
    assert "Dry run: would send 12 letters to nowhere; nothing changed." in out
    assert (sent(connection, schema), batches(connection, schema)) == (0, [])

    with pytest.raises(typer.Exit) as refused:
        requeue_letters(connection, schema, Mode(dry_run=False, yes=False, as_json=False))
    assert refused.value.exit_code == 2
    assert "Letters to send" in capsys.readouterr().out
    assert sent(connection, schema) == 0

    requeue_letters(connection, schema, Mode(dry_run=False, yes=True, as_json=True))
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "action": "send",
        "dry_run": False,
        "matched": 12,
        "changed": 12,
        "count": 3,
        "items": [{"id": 1}, {"id": 2}, {"id": 3}],
        "store": "letters",
        "failed": 0,
    }
    assert sent(connection, schema) == 12
    assert batches(connection, schema) == [5, 5, 2, 0]

    with pytest.raises(typer.Exit) as nothing:
        requeue_letters(connection, schema, Mode(dry_run=False, yes=True, as_json=False))
    assert nothing.value.exit_code == 0
    assert capsys.readouterr().out.strip() == "No letters left. Nothing to do."


def test_a_partly_failed_change_says_so_on_stderr_and_exits_3(
    letters: tuple[psycopg.Connection[Any], str], capsys: pytest.CaptureFixture[str]
) -> None:
    connection, schema = letters
    with pytest.raises(typer.Exit) as failed:
        requeue_letters(connection, schema, Mode(dry_run=False, yes=True, as_json=False), failing=1)
    assert failed.value.exit_code == 3
    captured = capsys.readouterr()
    assert "Sent 12 letters." in captured.out
    assert "not sent: letter 0" in captured.err


def test_an_operator_who_says_no_changes_nothing(
    letters: tuple[psycopg.Connection[Any], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connection, schema = letters
    questions: list[str] = []

    class Terminal:
        def isatty(self) -> bool:
            return True

    def answer(question: str, **_: Any) -> bool:
        questions.append(question)
        return False

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("postroom.cli.output.typer.confirm", answer)
    with pytest.raises(typer.Exit) as declined:
        requeue_letters(connection, schema, Mode(dry_run=False, yes=False, as_json=False))
    assert declined.value.exit_code == 1
    assert questions == ["Send 12 letters from the table?"]
    assert "Nothing changed." in capsys.readouterr().err
    assert (sent(connection, schema), batches(connection, schema)) == (0, [])
