"""deploy/Dockerfile: lint-clean, multi-stage, pinned, non-root, and running real commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.deploy.support import DEPLOY, ROOT, WITH_VENV, check_place, run, tool

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing() -> None:
    result = run(tool("hadolint", install=WITH_VENV), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_stages_build_from_an_exact_base_and_run_as_a_user() -> None:
    steps = instructions(DOCKERFILE)
    bases = [args.split()[0] for keyword, args in steps if keyword == "FROM"]
    stages = [args.split()[-1] for keyword, args in steps if keyword == "FROM"]
    assert stages == ["build", "runtime", "example"]
    for base in bases[:2]:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    assert bases[2] == "runtime"
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users
    assert all(not u.startswith(("0", "root")) for u in users), users
    copied = [args for keyword, args in steps if keyword == "COPY"]
    assert any(c.startswith("--from=build ") for c in copied), "runtime copies the build's venv"


def test_commands_and_variables_are_the_clis() -> None:
    steps = instructions(DOCKERFILE)
    entrypoint = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == [["postroom"]]
    cmds = [json.loads(args) for keyword, args in steps if keyword == "CMD"]
    assert cmds == [["relay"], ["consume", "billing:consumer"]]
    variables = [
        name for keyword, args in steps if keyword == "ENV" for name in re.findall(r"(\w+)=", args)
    ]
    assert "POSTROOM_METRICS_HOST" in variables
    check_place("deploy/Dockerfile", cmds, [], shared=variables)


def test_the_example_consumer_it_copies_exists_and_dockerignore_lets_it_in() -> None:
    steps = instructions(DOCKERFILE)
    sources = [
        part
        for keyword, args in steps
        if keyword == "COPY" and not args.startswith("--from")
        for part in args.split()[:-1]
        if not part.startswith("--")
    ]
    assert "deploy/example/billing.py" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :].count("*") == 1, "everything is excluded first"
    for source in sources:
        top = source.split("/")[0]
        allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
        assert top in allowed or source.rsplit("/", 1)[0] in allowed, (
            f"{source} is excluded by .dockerignore"
        )
