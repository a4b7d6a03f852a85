"""The ``postroom`` command line: database migrations now; relay, consumers and operations next."""

from __future__ import annotations

from postroom.cli.app import app, main

__all__ = ["app", "main"]
