"""deploy/prometheus/: rules promtool accepts and its unit tests prove, on exported metrics
only, each alert with a runbook section in docs/operations.md."""

from __future__ import annotations

import re

import yaml

from tests.deploy.support import (
    DEPLOY,
    OPERATIONS,
    RULES,
    RULES_TEST,
    WITH_APT,
    exported_metric_names,
    metric_names,
    recorded_names,
    rules,
    run,
    tool,
)


def promtool() -> str:
    """promtool from Debian's prometheus package."""
    return tool("promtool", install=WITH_APT)


def alerts() -> dict[str, dict[str, object]]:
    """The alerting rules by name."""
    return {r["alert"]: r for r in rules() if "alert" in r}


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text."""
    anchors = set()
    for line in markdown.splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_promtool_checks_the_rules_and_the_compose_config() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    result = run(promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    result = run(promtool(), "test", "rules", str(RULES_TEST), cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    proven = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert proven == set(alerts()), f"alerts without a firing test: {set(alerts()) - proven}"


def test_rules_read_only_metrics_the_services_export() -> None:
    known = exported_metric_names() | recorded_names()
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')} reads {unknown}"


def test_every_alert_links_a_runbook_heading_in_operations_md() -> None:
    anchors = heading_anchors(OPERATIONS.read_text())
    for name, rule in alerts().items():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"], name
        page, _, anchor = str(annotations["runbook_url"]).partition("#")
        assert page == "docs/operations.md", name
        assert anchor == name.lower(), f"{name} links #{anchor}"
        assert anchor in anchors, f"{name}: docs/operations.md has no heading #{anchor}"
        assert rule["labels"]["severity"] in {"warning", "critical"}  # type: ignore[index]


def test_links_inside_the_runbook_resolve() -> None:
    text = OPERATIONS.read_text()
    runbook = text[text.index("\n## Runbook\n") :]
    links = re.findall(r"\]\(#([^)]+)\)", runbook)
    assert links
    missing = set(links) - heading_anchors(text)
    assert not missing, f"links to no heading: {missing}"
