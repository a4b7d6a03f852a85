"""deploy/systemd/: units systemd-analyze verifies, running real commands and settings."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from tests.deploy.support import (
    DEPLOY,
    MIB,
    WITH_APT,
    check_place,
    consumer_memory_needed,
    relay_memory_needed,
    run,
    tool,
)
from tests.support.cli import postroom_command

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED = "/opt/postroom/bin/postroom"


def unit(path: Path) -> configparser.ConfigParser:
    """A unit file parsed (keys keep their case; repeated keys are not used by these)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_systemd_analyze_verifies_the_units_without_a_word(tmp_path: Path) -> None:
    # verify checks that each command exists: point the units at this checkout's postroom.
    (script,) = postroom_command()[:1]
    copies = []
    for path in UNITS:
        text = path.read_text()
        assert INSTALLED in text, f"{path.name} runs {INSTALLED}"
        copy = tmp_path / path.name
        copy.write_text(text.replace(INSTALLED, script))
        copies.append(str(copy))
    result = run(tool("systemd-analyze", install=WITH_APT), "verify", *copies)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_units_run_real_commands_with_real_settings() -> None:
    example = (DEPLOY / "systemd" / "postroom.env.example").read_text().splitlines()
    from_file = [line.split("=", 1)[0] for line in example if line and not line.startswith("#")]
    assert {"POSTROOM_DATABASE_URL", "POSTROOM_BROKER_URL"} <= set(from_file)
    kinds = set()
    for path in UNITS:
        service = unit(path)["Service"]
        assert service["EnvironmentFile"] == "/etc/postroom/postroom.env"
        lines = [
            shlex.split(service[key]) for key in ("ExecStartPre", "ExecStart") if key in service
        ]
        for argv in lines:
            assert argv[0] == INSTALLED, f"{path.name}: {argv}"
        kinds.add(lines[-1][1])
        variables = [item.split("=", 1)[0] for item in shlex.split(service.get("Environment", ""))]
        check_place(path.name, [argv[1:] for argv in lines], variables, shared=from_file)
        assert service["DynamicUser"] == "yes"
        assert service["ProtectSystem"] == "strict"
        assert service["Restart"] == "on-failure"
        env = dict(item.split("=", 1) for item in shlex.split(service.get("Environment", "")))
        needed = relay_memory_needed if lines[-1][1] == "relay" else consumer_memory_needed
        assert int(service["MemoryMax"].removesuffix("M")) * MIB >= needed(env), path.name
    assert kinds == {"relay", "consume"}
