"""Run every benchmark, print one table, write JSON and PNG charts.

    python bench/run.py            # quick: a few minutes on a 2-core machine
    python bench/run.py --full     # the issue's sizes (50,000-message drains, 1,000,000 rows)
    python bench/run.py --only throughput,latency

Every figure stands beside a baseline measured in the same run (the raw broker client,
the consumer without its inbox, the table without history, one relay), as a ratio:
absolute rates on a shared 2-core machine are noisy, ratios much less so.
Results go to ``bench/results/latest.json`` (and ``<timestamp>.json``) and, when
matplotlib is installed (``pip install --group bench``), ``bench/results/*.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

#: Sizes per mode. Quick mode keeps every scenario but shrinks it (stated in the table).
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "throughput_messages": 10_000,
        "latency_rates": [200, 1000],
        "latency_seconds": 3.0,
        "consumer_messages": 2_000,
        "history_rows": 200_000,
        "history_messages": 10_000,
        "relays_messages": 20_000,
        "memory_rows": 100_000,
        "cost_messages": 10_000,
        "notify_seconds": 2.0,
    },
    "full": {
        "throughput_messages": 50_000,
        "latency_rates": [200, 1000, 3000],
        "latency_seconds": 10.0,
        "consumer_messages": 10_000,
        "history_rows": 1_000_000,
        "history_messages": 50_000,
        "relays_messages": 100_000,
        "memory_rows": 1_000_000,
        "cost_messages": 50_000,
        "notify_seconds": 5.0,
    },
}
SCENARIOS = ("throughput", "latency", "consumer", "scale", "cost")
COLUMNS = (
    ("scenario", "scenario"),
    ("broker", "broker"),
    ("measured", "measured"),
    ("baseline", "baseline (same run)"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("met", "met?"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "ratio":
        return "" if value is None else f"{value:.2f}"
    if key == "met":
        return {True: "yes", False: "NO", None: "-"}[value]
    return str(value or "")


def format_table(rows: list[dict[str, Any]], *, markdown: bool = False) -> str:
    """The summary as aligned text (or a Markdown table)."""
    header = [title for _, title in COLUMNS]
    body = [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in column) for column in zip(header, *body, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows), flush=True)


def save(rows: list[dict[str, Any]], name: str, **extra: Any) -> Path:
    """Write ``bench/results/<name>.json`` (rows plus ``extra``); return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"rows": rows, **extra}, indent=2, default=str))
    return path


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "commit": commit,
    }


async def run_all(mode: str, only: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the chosen scenarios in order; a scenario that fails is reported, not fatal."""
    import consumer_overhead
    import cost
    import relay_latency
    import relay_throughput
    import scale
    from common import result_row

    sizes = SIZES[mode]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"timings": {}}

    async def step(name: str, coroutine: Any) -> Any:
        print(f"-- {name} ...", flush=True)
        started = time.perf_counter()
        try:
            return await coroutine
        except Exception as exc:
            traceback.print_exc()
            failed = f"FAILED: {type(exc).__name__}: {exc}"[:120]
            rows.append(result_row(name, "", failed, "", None, "", False, error=repr(exc)))
            return None
        finally:
            extra["timings"][name] = round(time.perf_counter() - started, 1)
            print(f"   {name}: {extra['timings'][name]} s", flush=True)

    brokers = ["rabbitmq", "kafka"]
    # (group chosen with --only, step name, the scenario, where its side data goes)
    plan: list[tuple[str, str, Callable[[], Any], str | None]] = [
        (
            "throughput",
            "throughput",
            lambda: relay_throughput.scenario(sizes["throughput_messages"], brokers),
            None,
        ),
        (
            "latency",
            "latency",
            lambda: relay_latency.scenario(sizes["latency_rates"], sizes["latency_seconds"]),
            "latency_samples",
        ),
        (
            "consumer",
            "consumer",
            lambda: consumer_overhead.scenario(sizes["consumer_messages"], brokers),
            None,
        ),
        (
            "scale",
            "scale history",
            lambda: scale.history_scenario(sizes["history_messages"], sizes["history_rows"]),
            None,
        ),
        ("scale", "scale relays", lambda: scale.relays_scenario(sizes["relays_messages"]), None),
        (
            "scale",
            "scale memory",
            lambda: scale.memory_scenario(sizes["memory_rows"]),
            "rss_series",
        ),
        (
            "cost",
            "cost",
            lambda: cost.scenario(sizes["cost_messages"], sizes["notify_seconds"]),
            None,
        ),
    ]
    for group, name, scenario, side in plan:
        if group not in only:
            continue
        got = await step(name, scenario())
        if got is None:
            continue
        if side is not None:
            got, extra[side] = got
        rows += got
        for row in got:
            cells = (_cell(row, key) for key in ("measured", "baseline", "met"))
            print("   " + " | ".join(cells), flush=True)
    samples = extra.get("latency_samples")
    if samples is not None:
        extra["latency_samples"] = {f"{r['load']}, {r['sender']}": r["samples"] for r in samples}
    return rows, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--full", action="store_true", help="the issue's full sizes")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}"
    )
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    from common import quiet

    quiet()
    mode = "full" if args.full else "quick"
    print(f"postroom benchmarks, {mode} mode: {', '.join(only)}", flush=True)
    started = time.perf_counter()
    rows, extra = asyncio.run(run_all(mode, only))
    samples = extra.pop("latency_samples", {})
    rss = extra.get("rss_series")
    meta = {"mode": mode, "sizes": SIZES[mode], **environment(), **extra}
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    print()
    print_table(rows)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    save(rows, f"{mode}-{stamp}", meta=meta)
    path = save(rows, "latest", meta=meta)
    (RESULTS / "latest.md").write_text(format_table(rows, markdown=True) + "\n")
    print(f"\nresults: {path} (and latest.md); {meta['total_seconds']} s in all")
    import charts

    if not charts.available():
        print(
            "charts: skipped, matplotlib is not installed; "
            "install the bench group: .venv/bin/pip install --group bench"
        )
    else:
        for written in charts.draw(rows, samples, rss, RESULTS):
            print(f"chart: {written}")
    missed = [r for r in rows if r.get("met") is False]
    if missed:
        print(f"{len(missed)} target(s) missed or scenario(s) failed (see 'met?').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
