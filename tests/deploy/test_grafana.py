"""deploy/grafana/postroom.json: every panel's query reads metrics the services export
(or series the rules record)."""

from __future__ import annotations

import json
from typing import Any

from tests.deploy.support import (
    DEPLOY,
    exported_metric_names,
    metric_names,
    recorded_names,
    rules,
)

DASHBOARD = DEPLOY / "grafana" / "postroom.json"


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def test_every_panel_query_reads_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert graphs
    assert all(p.get("targets") for p in graphs), "every panel has a query"
    known = exported_metric_names() | recorded_names()
    read: set[str] = set()
    for title, expr in queries():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert not names - known, f"{title}: {names - known} is not exported"
        read |= names
    for rule in rules():  # a recorded series shows the metrics its rule reads
        if rule.get("record") in read:
            read |= metric_names(rule["expr"])
    unshown = {n for n in exported_metric_names() if not n.endswith(("_sum", "_count"))} - read
    assert not unshown, f"metrics no panel shows: {sorted(unshown)}"
