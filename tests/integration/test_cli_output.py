"""Output for people, through the real ``postroom`` process on real PostgreSQL: tables that
stay readable at any width and when piped, control characters and markup shown rather than
obeyed, NO_COLOR, progress bars only on a terminal, and one JSON shape for every listing and
every change."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Sequence

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from postroom.message import Message
from postroom.outbox import Outbox
from postroom.schema import Tables
from tests.support.cli import as_json, postroom_command, run_postroom
from tests.support.services import AMQP_URL, rabbitmq_available
from tests.support.terminal import colour_codes, control_bytes, run_in_terminal, without_styles

HOSTILE_KEY = "\x1b[2J\r\x07[bold]x[/]"
HOSTILE_ERROR = "boom \x1b[31mred\r\x07 [bold]x[/] \x9b2J [/x] end"
LONG_ERROR = (
    "unroutable: RabbitMQ returned the message (312 NO_ROUTE): no queue is bound to exchange "
    "'postroom' for routing key 'orders.created'; bind a queue to that topic or dead-letter it"
)
HEADERS = ["id", "topic", "key", "state", "attempts", "age", "when", "last error"]


def cli(tables: Tables, *args: str, columns: str = "200") -> subprocess.CompletedProcess[str]:
    """``postroom ARGS`` on this test's schema, piped, ``columns`` wide ("" for unset)."""
    return run_postroom(*args, env={"POSTROOM_SCHEMA": tables.schema or "", "COLUMNS": columns})


def dead_rows(
    engine: Engine, outbox: Outbox, tables: Tables, keys: Sequence[str], error: str
) -> list[Message]:
    """One dead row per key (7 failed attempts, ``error`` its last error)."""
    with Session(engine) as session:
        written = outbox.enqueue_many(
            session,
            [
                outbox.message("orders.created", {"n": i}, key=key, headers={"trace": key})
                for i, key in enumerate(keys)
            ],
        )
        session.commit()
    with engine.begin() as connection:
        connection.execute(
            tables.outbox.update().values(
                status="dead", attempts=7, last_error=error, dead_lettered_at=text("now()")
            )
        )
    return written


def inbox_entries(engine: Engine, tables: Tables, consumer: str, ids: Sequence[str]) -> None:
    with engine.begin() as connection:
        connection.execute(
            tables.inbox.insert(), [{"consumer": consumer, "message_id": i} for i in ids]
        )


def fitted(output: str, width: int) -> list[str]:
    """The lines of ``output`` wider than ``width``, but for whole ids in a record."""
    return [
        line for line in output.splitlines() if len(line) > width and not line.startswith("id:")
    ]


@pytest.mark.parametrize("columns", ["200", "80", "40", ""])
def test_outbox_ls_keeps_ids_states_and_attempts_whole_at_any_width(
    columns: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    keys = [f"customer-{i}-" + "k" * 70 for i in range(3)]
    written = dead_rows(engine, outbox, tables, keys, LONG_ERROR)
    width = int(columns or 80)  # piped without COLUMNS: 80

    shown = cli(tables, "outbox", "ls", columns=columns)

    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert fitted(out, width) == []
    assert "…" in out  # the keys and the error were shortened, not wrapped
    if re.search(r"^id:", out, re.MULTILINE):  # one field: value block per row
        assert width < 200
        blocks = out.strip().split("\n\n")
        assert len(blocks) == len(written)
        for message, block in zip(written, blocks, strict=True):
            labels = [line.split(":", 1)[0] for line in block.splitlines()[: len(HEADERS)]]
            assert labels == HEADERS
            assert re.search(rf"^id:\s+{message.id}$", block, re.MULTILINE)
            assert re.search(r"^state:\s+dead$", block, re.MULTILINE)
            assert re.search(r"^attempts:\s+7$", block, re.MULTILINE)
    else:
        header, *rows, summary = out.splitlines()
        headers = re.split(r"\s{2,}", header.strip())
        assert headers in (HEADERS, [h for h in HEADERS if h not in {"age", "when"}])
        assert summary == "3 of 3 matching rows, oldest first."
        for message, line in zip(written, rows, strict=True):
            cells = dict(zip(headers, re.split(r"\s{2,}", line.strip()), strict=True))
            assert (cells["id"], cells["state"], cells["attempts"]) == (
                str(message.id),
                "dead",
                "7",
            )
            assert cells["key"].startswith("customer-")
            assert cells["key"].endswith("…")


@pytest.mark.parametrize("columns", ["80", "40", ""])
def test_inbox_and_status_tables_fit_without_splitting_a_header(
    columns: str, engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    width = int(columns or 80)
    ids = [f"{uuid.uuid4()}-redelivered-from-the-old-cluster-{i}" for i in range(2)]
    inbox_entries(engine, tables, "billing", ids)
    dead_rows(engine, outbox, tables, ["k"], "boom")

    entries = cli(tables, "inbox", "ls", "-c", "billing", columns=columns)
    assert entries.returncode == 0, entries.stderr
    assert fitted(entries.stdout, width) == []
    assert "2 of 2 matching entries" in entries.stdout
    for header in ("message id", "consumer", "processed", "age"):
        assert re.search(rf"^{header}(:|\s)|\s{header}(\s|$)", entries.stdout, re.MULTILINE)

    status = cli(tables, "outbox", "status", columns=columns)
    assert status.returncode == 0, status.stderr
    tables_part = status.stdout.split("By topic\n", 1)[1].split("No relay is registered")[0]
    assert fitted(tables_part, width) == []
    assert re.search(r"^(topic:\s+orders\.created$|topic\s.*backing off)", tables_part, re.M)


def test_control_characters_and_markup_are_shown_not_obeyed(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    (message,) = dead_rows(engine, outbox, tables, [HOSTILE_KEY], HOSTILE_ERROR)
    escaped = ["\\x1b[2J", "\\r", "\\x07", "[bold]x[/]", "\\x1b[31mred", "\\x9b2J", "[/x]"]

    for args, columns in [
        (("outbox", "ls"), "200"),
        (("outbox", "ls"), "40"),
        (("outbox", "show", str(message.id)), "200"),
        (("outbox", "retry", "--all", "--dry-run"), "200"),
    ]:
        shown = cli(tables, *args, columns=columns)
        assert shown.returncode == 0, shown.stderr
        assert control_bytes(shown.stdout + shown.stderr) == [], args
        assert all(form in shown.stdout for form in escaped[:4]), (args, shown.stdout)
    detail = cli(tables, "outbox", "show", str(message.id)).stdout
    assert all(form in detail for form in escaped), detail

    nothing = cli(tables, "outbox", "ls", "--key", "\x1b[2Jnope")
    assert nothing.returncode == 0
    assert control_bytes(nothing.stdout) == []
    assert "No outbox rows match (key \\x1b[2Jnope)." in nothing.stdout

    raw = as_json(cli(tables, "outbox", "ls", "--json"))["items"][0]
    assert (raw["key"], raw["last_error"]) == (HOSTILE_KEY, HOSTILE_ERROR)
    assert as_json(cli(tables, "outbox", "show", str(message.id), "--json"))["headers"] == {
        "trace": HOSTILE_KEY
    }

    markup = cli(tables, "outbox", "show", "[/x]")
    assert markup.returncode == 2
    assert "error: '[/x]' is not a message id" in markup.stderr
    assert "Traceback" not in markup.stderr


def test_no_color_is_honoured_by_tables_errors_and_console_logs(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    dead_rows(engine, outbox, tables, ["k-1"], "boom")
    # NO_COLOR="" counts as unset (https://no-color.org), whatever the test run inherited.
    env = {"POSTROOM_SCHEMA": tables.schema or "", "COLUMNS": "200", "NO_COLOR": ""}
    bad_id = [*postroom_command(), "outbox", "show", "not-an-id"]

    coloured = run_in_terminal(bad_id, env=env)
    assert coloured.returncode == 2
    assert colour_codes(coloured.output), coloured.output  # "error:" in red on a terminal
    plain = run_in_terminal(bad_id, env={**env, "NO_COLOR": "1"})
    assert plain.returncode == 2
    assert "error: 'not-an-id' is not a message id" in without_styles(plain.output)
    assert colour_codes(plain.output) == []
    listed = run_in_terminal([*postroom_command(), "outbox", "ls"], env={**env, "NO_COLOR": "1"})
    assert listed.returncode == 0
    assert "k-1" in listed.output
    assert colour_codes(listed.output) == []

    log = [
        sys.executable,
        "-c",
        "from postroom.log import configure_logging, get_logger\n"
        "configure_logging(json=False)\n"
        "get_logger('relay').warning('broker unreachable', attempt=3)\n",
    ]
    on_terminal = run_in_terminal(log, env={"NO_COLOR": ""})
    assert "broker unreachable" in on_terminal.output
    assert colour_codes(on_terminal.output)
    without_colour = run_in_terminal(log, env={"NO_COLOR": "1"})
    assert "broker unreachable" in without_colour.output
    assert colour_codes(without_colour.output) == []
    piped = subprocess.run(log, capture_output=True, text=True, check=True)
    assert "broker unreachable" in piped.stderr
    assert "\x1b" not in piped.stderr


def published_rows(engine: Engine, outbox: Outbox, tables: Tables, count: int) -> None:
    with Session(engine) as session:
        outbox.enqueue_many(
            session, [outbox.message("orders", {"n": i}, key=f"k{i % 50}") for i in range(count)]
        )
        session.commit()
    mark_published(engine, tables)


def mark_published(engine: Engine, tables: Tables) -> None:
    with engine.begin() as connection:
        connection.execute(
            tables.outbox.update().values(status="published", published_at=text("now()"))
        )


def test_a_long_change_shows_a_progress_bar_on_a_terminal_only(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    published_rows(engine, outbox, tables, 3000)
    replay = [*postroom_command(), "outbox", "replay", "--all", "--yes"]
    env = {"POSTROOM_SCHEMA": tables.schema or "", "COLUMNS": "120"}

    terminal = run_in_terminal(replay, env=env)

    assert terminal.returncode == 0, terminal.output
    assert "replay published rows" in terminal.output
    assert "3000/3000" in terminal.output
    assert "Replaying 3000 messages" in terminal.output

    mark_published(engine, tables)
    piped = cli(tables, "outbox", "replay", "--all", "--yes", columns="120")
    assert piped.returncode == 0, piped.stderr
    assert "Replaying 3000 messages" in piped.stdout
    assert "replay published rows" not in piped.stderr + piped.stdout
    assert "3000/3000" not in piped.stderr
    assert control_bytes(piped.stderr + piped.stdout) == []


def test_a_dead_letter_scan_shows_a_progress_bar_on_a_terminal_only() -> None:
    rabbitmq_available()
    consumer = f"output-{uuid.uuid4().hex[:8]}"
    args = ["dead-letter", "ls", "-c", consumer]
    env = {"POSTROOM_BROKER_URL": AMQP_URL, "COLUMNS": "120"}

    terminal = run_in_terminal([*postroom_command(), *args], env=env)

    assert terminal.returncode == 0, terminal.output
    assert f"reading dead letters of {consumer}" in terminal.output
    assert f"No dead letters for consumer {consumer!r}" in terminal.output
    piped = run_postroom(*args, env=env)
    assert piped.returncode == 0, piped.stderr
    assert "reading dead letters" not in piped.stderr + piped.stdout


LIST_KEYS = {"matched", "count", "items"}
CHANGE_KEYS = {"action", "dry_run", "matched", "changed", "count", "items"}


def test_every_listing_and_every_change_prints_the_same_json_shape(
    engine: Engine, outbox: Outbox, tables: Tables
) -> None:
    dead_rows(engine, outbox, tables, ["k-1", "k-2"], "boom")
    inbox_entries(engine, tables, "billing", ["m1", "m2", "m3"])

    for args, items in [
        (("outbox", "ls"), 2),
        (("inbox", "ls"), 1),
        (("inbox", "ls", "-c", "billing"), 3),
    ]:
        listed = as_json(cli(tables, *args, "--json"))
        assert listed.keys() >= LIST_KEYS, args
        assert listed["count"] == len(listed["items"]) == listed["matched"] == items, args

    for args, action, matched in [
        (("outbox", "retry", "--all", "--dry-run"), "retry", 2),
        (("outbox", "replay", "--all", "--dry-run"), "replay", 0),
        (("outbox", "purge", "--older-than", "1h", "-s", "dead", "--dry-run"), "delete", 0),
        (("inbox", "forget", "-c", "billing", "--all", "--dry-run"), "forget", 3),
        (("inbox", "purge", "--older-than", "1h", "--dry-run"), "delete", 0),
        (("inbox", "forget", "-c", "billing", "m2", "--yes"), "forget", 1),
    ]:
        changed = as_json(cli(tables, *args, "--json"))
        assert changed.keys() >= CHANGE_KEYS, args
        assert (changed["action"], changed["matched"]) == (action, matched), args
        assert changed["count"] == len(changed["items"]) == matched, args
        assert changed["dry_run"] is ("--dry-run" in args)
        assert changed["changed"] == (0 if "--dry-run" in args else matched)
