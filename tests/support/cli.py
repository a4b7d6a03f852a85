"""Running the ``postroom`` command as a subprocess, as an operator would.

:func:`run_postroom` runs ``python -m postroom ARGS`` to completion and captures its output
(``clean=True`` drops every ``POSTROOM_*`` variable the test run inherited, so only ``env``
configures it); :func:`arun_postroom` does so in a thread, so an in-process relay or consumer
keeps running meanwhile; :func:`as_json` reads a successful ``--json`` answer.
:func:`postroom_command` is the console script long-running processes are started with
(:mod:`tests.support.processes`, the benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def postroom_command() -> list[str]:
    """How to run the ``postroom`` console script of the interpreter running the tests."""
    script = shutil.which("postroom", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "postroom"]


def environment(env: Mapping[str, str] | None = None, *, clean: bool = False) -> dict[str, str]:
    """This process's environment (without ``POSTROOM_*`` if ``clean``), updated by ``env``."""
    inherited = {k: v for k, v in os.environ.items() if not (clean and k.startswith("POSTROOM_"))}
    return {**inherited, **(env or {})}


def run_postroom(
    *args: str, env: Mapping[str, str] | None = None, clean: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m postroom ARGS`` to completion; its status, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "postroom", *args],
        capture_output=True,
        text=True,
        env=environment(env, clean=clean),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


async def arun_postroom(
    *args: str, env: Mapping[str, str] | None = None, clean: bool = False
) -> subprocess.CompletedProcess[str]:
    """:func:`run_postroom` in a thread, so the test's event loop keeps running meanwhile."""
    return await asyncio.to_thread(run_postroom, *args, env=env, clean=clean)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful command printed (fails the test, with stderr, otherwise)."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
