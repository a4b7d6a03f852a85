"""Fitted tables and printable text, rendered by rich at chosen widths."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from postroom.cli.tables import FittedTable
from postroom.cli.text import printable

ID = "01a24eca-300c-71a1-99ee-e229e7ceaeed"


def rendered(table: FittedTable, width: int) -> str:
    """What ``table`` prints on a ``width``-column console without a terminal."""
    out = io.StringIO()
    Console(file=out, width=width, soft_wrap=True).print(table)
    return out.getvalue()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("a\rb\tc\nd", "a\\rb\\tc\\nd"),
        ("bell\x07 del\x7f csi\x9b", "bell\\x07 del\\x7f csi\\x9b"),
        ("grüße ✓ [bold]x[/]", "grüße ✓ [bold]x[/]"),
    ],
)
def test_control_characters_are_shown_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_kept_characters_stay() -> None:
    assert printable("one\ntwo\r", keep="\n") == "one\ntwo\\r"


def test_a_table_that_fits_keeps_every_cell_whole_without_trailing_spaces() -> None:
    table = FittedTable("Rows", ["id", "key", "state"], [(ID, "k-1", "dead"), (ID, None, "x")])
    assert rendered(table, 80).splitlines() == [
        "Rows",
        "id                                    key  state",
        f"{ID}  k-1  dead",
        f"{ID}  -    x",
    ]


def test_free_text_is_shortened_but_never_below_its_header() -> None:
    error = "unroutable: " + "no queue is bound " * 10
    table = FittedTable(None, ["id", "error", "n"], [(ID, error, 7)], free={"error"})
    header, row = rendered(table, 70).splitlines()
    assert len(row) == 70
    assert row.startswith(f"{ID}  unroutable: no queue")
    assert row.endswith("…  7")
    assert header.split() == ["id", "error", "n"]


def test_wide_characters_are_measured_in_cells() -> None:
    table = FittedTable(None, ["id", "key"], [(ID, "鍵" * 40)], free={"key"})
    _, row = rendered(table, 60).splitlines()
    assert row.startswith(ID)
    assert row.endswith("…")
    assert Console().measure(row).maximum <= 60


def test_rows_become_records_when_the_columns_cannot_fit() -> None:
    rows = [(ID, "orders.created", "x" * 50, "dead", 7), (ID, "t", "k", "pending", 0)]
    table = FittedTable(
        "Rows", ["id", "topic", "key", "state", "attempts"], rows, free={"topic", "key"}
    )
    text = rendered(table, 40)
    assert text.split("\n\n") == [
        "Rows\n"
        f"id:       {ID}\n"
        "topic:    orders.created\n"
        f"key:      {'x' * 29}…\n"
        "state:    dead\n"
        "attempts: 7",
        f"id:       {ID}\ntopic:    t\nkey:      k\nstate:    pending\nattempts: 0\n",
    ]


def test_optional_columns_are_left_out_before_rows_become_records() -> None:
    rows = [(ID, "dead", "3m 12s", "unroutable: no queue is bound to the exchange")]
    table = FittedTable(
        None, ["id", "state", "age", "last error"], rows, free={"last error"}, optional=["age"]
    )
    assert rendered(table, 120).splitlines()[0].split() == ["id", "state", "age", "last", "error"]
    narrow = rendered(table, 70).splitlines()
    assert narrow[0].split() == ["id", "state", "last", "error"]
    assert narrow[1] == f"{ID}  dead   unroutable: no queue is …"
    assert rendered(table, 50).splitlines()[0] == f"id:         {ID}"
