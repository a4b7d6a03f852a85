"""The fault suite's report: one :class:`Outcome` per run, as a Markdown table and as JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.profile import PROFILE, SEED


@dataclass
class Outcome:
    """One row of the report: what a scenario did to one broker and what the checks found."""

    scenario: str
    broker: str
    seed: int
    profile: str
    messages: int = 0
    faults: int = 0
    fault_note: str = ""
    lost: int = 0
    wire_duplicates: int = 0
    applied_twice: int = 0
    order_violations: int = 0
    inbox_skips: int = 0
    """Deliveries the consumers acknowledged without running the handler (already applied)."""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """No loss, nothing applied twice, order kept, nothing else wrong."""
        return not (self.lost or self.applied_twice or self.order_violations or self.problems)

    def as_json(self) -> dict[str, Any]:
        """The row as JSON (with ``passed``)."""
        return {**asdict(self), "passed": self.passed}


OUTCOMES: list[Outcome] = []
"""Every run of this session, in order (the report is made of them)."""

COLUMNS = (
    ("scenario", "scenario"),
    ("broker", "broker"),
    ("messages", "messages"),
    ("faults", "faults"),
    ("lost", "lost"),
    ("wire_duplicates", "dup. on wire"),
    ("applied_twice", "applied twice"),
    ("order_violations", "order viol."),
    ("inbox_skips", "skipped by inbox"),
    ("seconds", "seconds"),
)


def report_table(outcomes: Iterable[Outcome]) -> str:
    """The outcomes as a Markdown table (faults with their note, a verdict per row)."""
    header = [title for _, title in COLUMNS] + ["verdict"]
    rows = []
    for outcome in outcomes:
        cells = []
        for name, _ in COLUMNS:
            value = getattr(outcome, name)
            if name == "faults" and outcome.fault_note:
                value = f"{value} ({outcome.fault_note})"
            elif name == "seconds":
                value = f"{value:.0f}"
            cells.append(str(value))
        cells.append("ok" if outcome.passed else "FAILED: " + "; ".join(outcome.problems)[:200])
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def write_report(path: Path, outcomes: list[Outcome]) -> None:
    """Write the session's outcomes as JSON (profile, seed and one object per run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "profile": PROFILE.name,
        "seed": SEED,
        "passed": all(o.passed for o in outcomes),
        "runs": [o.as_json() for o in outcomes],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
