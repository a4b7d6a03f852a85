"""PNG charts of a benchmark run (needs matplotlib: ``pip install --group bench``).

- ``latency.png``: the distribution (empirical CDF) of commit-to-consumer latency per
  offered load, the relay beside aio-pika publishing directly.
- ``throughput.png``: messages/s per scenario, postroom beside its same-run baseline.
- ``memory.png``: the relay's resident memory while it drains the big backlog.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rates(row: dict[str, Any]) -> tuple[float, float, str, str] | None:
    """(measured, baseline) messages/s of a throughput-like row, with their labels."""
    d = row["details"]
    if row["broker"] == "memory":
        return d["ceiling_msgs_per_s"], d["raw_msgs_per_s"], "relay, no broker", "raw Kafka"
    if "relay_msgs_per_s" in d:
        return d["relay_msgs_per_s"], d["raw_msgs_per_s"], "relay", "raw client"
    if "inbox" in d:
        return d["inbox"]["rate"], d["no_inbox"]["rate"], "with inbox", "no inbox"
    if "with_history" in d:
        return d["with_history"]["rate"], d["empty"]["rate"], "with history", "empty table"
    if "two" in d:
        return d["two"]["rate"], d["one"]["rate"], "two relays", "one relay"
    return None


def draw_latency(samples: dict[str, list[float]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, values in samples.items():
        if not values:
            continue
        ms = sorted(v * 1000 for v in values)
        fractions = [(i + 1) / len(ms) for i in range(len(ms))]
        style = "--" if "raw" in name else "-"
        ax.plot(ms, fractions, style, label=f"{name} (n={len(ms)})")
    ax.set_xscale("log")
    ax.set_xlabel("commit (or raw publish) to consumer, ms (log scale)")
    ax.set_ylabel("fraction of messages")
    ax.axhline(0.99, color="grey", linewidth=0.5)
    ax.axvline(25, color="red", linewidth=0.5)
    ax.set_title("Latency distribution: relay (solid) vs aio-pika direct (dashed)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_throughput(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    bars = [(r, got) for r in rows if "details" in r and (got := rates(r)) is not None]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * len(bars)))
    labels = []
    for i, (row, (measured, baseline, m_label, b_label)) in enumerate(bars):
        y = len(bars) - 1 - i
        ax.barh(y + 0.2, baseline, height=0.38, color="#bbbbbb")
        ax.barh(y - 0.2, measured, height=0.38, color="#3b75af")
        ax.text(baseline, y + 0.2, f" {b_label} {baseline:,.0f}", va="center", fontsize=7)
        ratio = measured / baseline if baseline else 0
        ax.text(
            measured, y - 0.2, f" {m_label} {measured:,.0f} ({ratio:.2f}x)", va="center", fontsize=7
        )
        labels.append((y, textwrap.fill(f"{row['scenario']} [{row['broker']}]", 34)))
    ax.set_yticks([y for y, _ in labels], [label for _, label in labels], fontsize=7)
    ax.set_xlabel("messages/s (grey: same-run baseline)")
    ax.set_title("Throughput per scenario")
    ax.margins(x=0.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_memory(rss: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    series = rss["series"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([s[0] for s in series], [s[1] for s in series], color="#3b75af", label="RSS, MB")
    ax.set_xlabel("seconds since the relay started")
    ax.set_ylabel("resident memory, MB")
    ax.set_ylim(bottom=0)
    other = ax.twinx()
    other.plot([s[0] for s in series], [s[2] for s in series], color="#bbbbbb", label="published")
    other.set_ylabel("rows published")
    ax.set_title(f"Relay memory while draining {rss['rows']:,} rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(
    rows: list[dict[str, Any]],
    samples: dict[str, list[float]],
    rss: dict[str, Any] | None,
    directory: Path,
) -> list[Path]:
    """Every chart the run has data for; returns the files written."""
    written = []
    if samples:
        written.append(draw_latency(samples, directory / "latency.png"))
    if any("details" in r and rates(r) for r in rows):
        written.append(draw_throughput(rows, directory / "throughput.png"))
    if rss and rss.get("series"):
        written.append(draw_memory(rss, directory / "memory.png"))
    return written
