"""What the deploy checks share: the files under deploy/, the real CLI they must agree
with, the tools that lint them, and the metric names PromQL expressions may use.

:func:`check_place` is the cross-check every deploy file goes through: a *place* (a compose
service, a Kubernetes container, a systemd unit, the Dockerfile) runs some ``postroom``
command lines with some ``POSTROOM_*`` variables; each command line must parse as a real
command with real options, and each variable must be read by one of the place's commands.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from postroom.brokers.kafka.settings import ENV_PREFIX as KAFKA_ENV_PREFIX
from postroom.config import Settings
from postroom.consumer.metrics import ConsumerMetrics
from postroom.metrics import RelayMetrics
from tests.support.bad_options import commands

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = Path(__file__).resolve().parent / "rules_test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"


def load_yaml_documents(path: Path) -> list[Any]:
    """Every YAML document of ``path`` (empty ones left out)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


#: How to install what the deploy checks run: Python tools come with the dev group,
#: system tools from Debian's packages.
WITH_VENV = "run `make venv` (pyproject's dev group installs it)"
WITH_APT = "run `make deploy-tools` (it installs Debian's prometheus and systemd packages)"


def tool(name: str, *, install: str) -> str:
    """The path of command-line tool ``name``: the virtualenv's, else on PATH.

    A missing tool fails the test (never skips it) with ``install``, saying how to get it.
    """
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; {install}")
    return found


def run(
    *argv: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, capturing its output as text."""
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


# ----------------------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class CliCommand:
    """One runnable ``postroom`` command: its options and the variables it reads."""

    path: str
    options: frozenset[str]
    envvars: frozenset[str]


@cache
def cli_commands() -> dict[str, CliCommand]:
    """Every runnable command of the real app by its path (``db upgrade``), walked live."""
    found: dict[str, CliCommand] = {}
    for path, command in commands().items():
        options: set[str] = set()
        envvars: set[str] = set()
        for param in command.params:
            options.update(getattr(param, "opts", ()))
            options.update(getattr(param, "secondary_opts", ()))
            envvar = param.envvar
            envvars.update([envvar] if isinstance(envvar, str) else envvar or ())
        found[path] = CliCommand(path, frozenset(options), frozenset(envvars))
    return found


#: Variables the root command reads for every subcommand.
ROOT_ENVVARS = frozenset({"POSTROOM_DEBUG"})


def every_envvar() -> frozenset[str]:
    """Every ``POSTROOM_*`` variable some command reads."""
    return ROOT_ENVVARS.union(*(c.envvars for c in cli_commands().values()))


def resolve(argv: Sequence[str], where: str) -> CliCommand:
    """The command ``postroom ARGV`` runs; fails naming ``where`` if it is not one, or if
    it passes an option the command does not have."""
    known = cli_commands()
    words: list[str] = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
        if " ".join(words) in known:
            break
    path = " ".join(words)
    assert path in known, f"{where}: `postroom {' '.join(argv)}` is not a postroom command"
    command = known[path]
    for word in argv[len(words) :]:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert flag in command.options, f"{where}: `postroom {path}` has no option {flag}"
    return command


def check_place(
    where: str,
    command_lines: Iterable[Sequence[str]],
    envvars: Iterable[str],
    *,
    shared: Iterable[str] = (),
) -> None:
    """Each command line runs a real command; each variable is read by one of them.

    ``shared`` variables come from a source every service of a deployment reads (a Secret,
    an environment file, the image): each only has to be read by some postroom command.
    """
    resolved = [resolve(argv, where) for argv in command_lines]
    assert resolved, f"{where}: runs no postroom command"
    readers = ROOT_ENVVARS.union(*(c.envvars for c in resolved))
    for name in shared:
        if name.startswith("POSTROOM_") and not name.startswith(KAFKA_ENV_PREFIX):
            assert name in every_envvar(), f"{where}: {name} is no postroom setting"
    for name in envvars:
        if not name.startswith("POSTROOM_"):
            continue
        if name.startswith(KAFKA_ENV_PREFIX):
            # librdkafka settings (sasl.*, ssl.*), read wherever a broker URL is
            assert "POSTROOM_BROKER_URL" in readers, f"{where}: {name} is read by no command"
            continue
        assert name in every_envvar(), f"{where}: {name} is no postroom setting"
        assert name in readers, (
            f"{where}: {name} is read by none of {sorted(c.path for c in resolved)}"
        )


# ----------------------------------------------------------------------------- memory

MIB = 1024 * 1024
#: Interpreter, clients and code of a relay or consumer before any message (measured ~100
#: MB at start, docs/benchmarks.md).
BASELINE = 100 * MIB
#: Room for allocator fragmentation, decoded copies and the broker clients' own queues.
HEADROOM = 2


def relay_memory_needed(env: Mapping[str, str]) -> int:
    """Bytes a relay with these variables may need: three batches in memory at once, in
    three copies each, each up to one row (one payload) past the byte budget."""
    defaults = Settings()
    budget = int(env.get("POSTROOM_RELAY_BATCH_BYTES", defaults.relay_batch_bytes))
    payload = int(env.get("POSTROOM_MAX_PAYLOAD_BYTES", defaults.max_payload_bytes))
    return HEADROOM * (BASELINE + 3 * 3 * (budget + payload))


def consumer_memory_needed(env: Mapping[str, str]) -> int:
    """Bytes a consumer with these variables may need: its prefetched messages at their
    largest."""
    defaults = Settings()
    prefetch = int(env.get("POSTROOM_CONSUMER_PREFETCH", defaults.consumer_prefetch))
    largest = int(
        env.get("POSTROOM_CONSUMER_MAX_MESSAGE_BYTES", defaults.consumer_max_message_bytes)
    )
    return HEADROOM * (BASELINE + prefetch * largest)


# ----------------------------------------------------------------------------- metrics


def exported_metric_names() -> frozenset[str]:
    """The sample names the relay and the consumer expose on /metrics (from their metric
    registries, so labelled metrics count before their first sample), and Prometheus' own
    ``up``."""
    names = {"up"}
    for registry in (RelayMetrics().registry, ConsumerMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return frozenset(names)


def recorded_names() -> frozenset[str]:
    """The series deploy/prometheus/rules.yml records."""
    return frozenset(r["record"] for r in rules() if "record" in r)


def rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of deploy/prometheus/rules.yml."""
    (document,) = load_yaml_documents(RULES)
    return [rule for group in document["groups"] for rule in group["rules"]]


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "e"})


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression reads.

    Label matchers, ranges, string literals and grouping clauses are removed; what is
    left that is a name and not a function call, a keyword or a number is a metric name.
    """
    text = _GROUPING.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr)))
    names: set[str] = set()
    for match in _NAME.finditer(text):
        rest = text[match.end() :].lstrip()
        before = text[: match.start()]
        if rest.startswith("(") or match.group() in _KEYWORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the exponent or unit of a number (1e3, 5m)
        names.add(match.group())
    return names
