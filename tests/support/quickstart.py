"""The README's Quickstart, read from README.md and run as written.

:func:`read_quickstart` takes the section's code blocks: each ``python`` block starts with a
``# <file>.py`` comment naming the file it belongs to; each line of a ``sh`` block is a
:class:`Step` (``pip install`` lines are left out: the package under test is installed).
:class:`Walkthrough` runs the steps in README order in a directory holding the Python files,
with only the connection URLs of the ``export POSTROOM_DATABASE_URL=`` and
``export POSTROOM_BROKER_URL=`` lines replaced: a command ending in ``&`` starts a
:class:`~tests.support.processes.ServiceProcess`, any other runs to completion and must exit 0.

:func:`fresh_database` and :func:`fresh_vhost` give each run a database and a RabbitMQ virtual
host of its own, so the README's fixed names (schema ``postroom``, queue ``billing``, tables
``orders`` and ``charges``) never meet another run's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from postroom.urls import psycopg_conninfo
from tests.support.processes import ServiceProcess
from tests.support.services import require_service

README = Path(__file__).resolve().parents[2] / "README.md"
DATABASE_VARIABLE = "POSTROOM_DATABASE_URL"
BROKER_VARIABLE = "POSTROOM_BROKER_URL"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FILE_COMMENT = re.compile(r"#\s*(\w+\.py)\s*$")
_COMMENT = re.compile(r"\s+#\s.*$")


@dataclass(frozen=True)
class Step:
    """One shell command of the Quickstart, without its comment."""

    command: str
    background: bool = False

    @property
    def words(self) -> list[str]:
        """The command split as the shell would (without a trailing ``&``)."""
        return shlex.split(self.command)


@dataclass(frozen=True)
class Quickstart:
    """The Python files and the shell steps of the README's Quickstart, in README order."""

    files: dict[str, str]
    steps: list[Step]


def quickstart_section(readme: Path = README) -> str:
    """The text of the README's ``## Quickstart`` section."""
    text = readme.read_text(encoding="utf-8")
    start = text.index("\n## Quickstart")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def read_quickstart(readme: Path = README) -> Quickstart:
    """The Quickstart's Python files and shell steps, as the README shows them."""
    files: dict[str, str] = {}
    steps: list[Step] = []
    for language, body in _BLOCK.findall(quickstart_section(readme)):
        if language == "python":
            first, _, rest = body.partition("\n")
            named = _FILE_COMMENT.fullmatch(first.strip())
            assert named, f"a Quickstart python block must start with '# <file>.py':\n{body}"
            files[named.group(1)] = files.get(named.group(1), "") + rest
        elif language == "sh":
            for line in body.splitlines():
                command = _COMMENT.sub("", line).strip()
                if not command or command.startswith("pip install"):
                    continue
                assert shlex.split(command, comments=True) == shlex.split(line, comments=True)
                background = command.endswith("&")
                steps.append(Step(command.removesuffix("&").strip(), background))
        else:
            raise AssertionError(f"the Quickstart has a {language!r} block the test cannot run")
    return Quickstart(files, steps)


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead of its own."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A database of its own on the server at ``url`` (its URL), dropped afterwards."""
    name = f"quickstart_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(psycopg_conninfo(url), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(psycopg_conninfo(url), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fresh_vhost(url: str) -> Iterator[str]:
    """A RabbitMQ virtual host of its own for the user of ``url`` (its URL), deleted with
    everything in it afterwards. Needs ``rabbitmqctl`` on this machine."""
    if shutil.which("rabbitmqctl") is None:
        require_service("rabbitmqctl", "it is needed to give the Quickstart a virtual host")
    parts = urlsplit(url)
    vhost = f"quickstart-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path=f"/{vhost}"))
    finally:
        _rabbitmqctl("delete_vhost", vhost)


class Walkthrough:
    """Runs a :class:`Quickstart` in ``directory`` with these connection URLs."""

    def __init__(
        self, quickstart: Quickstart, directory: Path, *, database_url: str, broker_url: str
    ) -> None:
        self.quickstart = quickstart
        self.directory = directory
        self.urls = {DATABASE_VARIABLE: database_url, BROKER_VARIABLE: broker_url}
        bin_dir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        self.env.update(
            {"PATH": f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}", "NO_COLOR": "1"}
        )
        self.env.pop("PYTHONPATH", None)
        self.processes: dict[str, ServiceProcess] = {}
        """The background processes by their first two words (``postroom relay``)."""
        self.substituted: set[str] = set()

    def write_files(self) -> None:
        """Write the Quickstart's Python files into the directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.quickstart.files.items():
            (self.directory / name).write_text(text)

    def run(self) -> None:
        """Every step, in README order; fails on the first command that exits non-zero."""
        self.write_files()
        for step in self.quickstart.steps:
            words = step.words
            if words[0] == "export":
                self._export(words[1:])
            elif step.background:
                self._start(step)
            else:
                self._run(step)
        missing = set(self.urls) - self.substituted
        assert not missing, f"the Quickstart no longer exports {sorted(missing)}"

    def _export(self, assignments: list[str]) -> None:
        for assignment in assignments:
            name, _, value = assignment.partition("=")
            if name in self.urls:
                value = self.urls[name]
                self.substituted.add(name)
            self.env[name] = value

    def _run(self, step: Step) -> None:
        result = subprocess.run(
            ["bash", "-c", step.command],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (
            f"`{step.command}` exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )

    def _start(self, step: Step) -> None:
        words = step.words
        kind = "consumer" if words[:2] == ["postroom", "consume"] else "relay"
        name = "-".join(words[:2])
        process = ServiceProcess(
            relay_id=name,
            command=["bash", "-c", f"cd {shlex.quote(str(self.directory))} && exec {step.command}"],
            env=self.env,
            log_path=self.directory / f"{name}.log",
            application_name=f"quickstart-{name}",
            kind=kind,
        )
        self.processes[" ".join(words[:2])] = process.start()

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every background process; their exit codes (None: had to be killed)."""
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.terminate()
            except AssertionError:
                codes[name] = None
        return codes

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (never raises)."""
        for process in self.processes.values():
            process.ensure_stopped()

    def tails(self) -> str:
        """The background processes' log tails, for failure messages."""
        return "\n".join(process.tail() for process in self.processes.values())
