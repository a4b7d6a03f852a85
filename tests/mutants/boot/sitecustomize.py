"""Apply the mutant named by ``TEST_MUTANT`` as this Python process starts.

A mutant run puts this directory first on ``PYTHONPATH``, so every process it starts —
pytest, and the relays and consumers the tests start — imports this module at start-up.
Without ``TEST_MUTANT`` it does nothing. With ``TEST_MUTANT_LOG`` too, each process
appends a line (the mutant and its pid) to that file, so a run can show where it applied.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _apply(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "mutants.py"
    spec = importlib.util.spec_from_file_location("postroom_test_mutants", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the mutants from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.named(name).patch()
    log = os.environ.get("TEST_MUTANT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as file:
            program = Path(sys.argv[0]).name if getattr(sys, "argv", None) else "?"
            file.write(f"{name} {os.getpid()} {program}\n")


_name = os.environ.get("TEST_MUTANT")
if _name:
    _apply(_name)
