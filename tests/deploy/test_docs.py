"""The runbook and the production checklist name real ``postroom`` commands and options."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import pytest

from tests.deploy.support import OPERATIONS, ROOT, resolve

CHECKLIST = ROOT / "docs" / "production-checklist.md"


def runbook() -> str:
    """The Runbook section of docs/operations.md."""
    text = OPERATIONS.read_text()
    return text[text.index("\n## Runbook\n") :]


def commands_in(text: str) -> list[list[str]]:
    """The ``postroom ...`` command lines quoted in inline code (line breaks joined)."""
    quoted = re.findall(r"`(postroom [^`]+)`", text.replace("\n", " "))
    return [shlex.split(re.sub(r"\s+", " ", q))[1:] for q in quoted]


def checklist() -> str:
    """docs/production-checklist.md."""
    return CHECKLIST.read_text()


DOCUMENTS: dict[str, Callable[[], str]] = {"runbook": runbook, "checklist": checklist}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_command_quoted_is_the_clis(name: str) -> None:
    lines = commands_in(DOCUMENTS[name]())
    assert len(lines) >= 5, f"the {name} quotes postroom commands"
    for argv in lines:
        resolve(argv, name)
