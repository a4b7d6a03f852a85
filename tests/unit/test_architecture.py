"""The package's shape, as docs/architecture.md draws it: one direction of imports, no circle.

Each rule reads the source with ``ast`` (imports inside functions count too; imports under
``if TYPE_CHECKING:`` do not, as they never run), so a change that breaks one fails here
with the modules named.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "postroom"
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    """``postroom.brokers.kafka`` for src/postroom/brokers/kafka.py."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except what sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for each runtime import of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield base, alias.name, node.lineno


def postroom_edges(module: str) -> set[str]:
    """The postroom modules ``module`` imports (a name that is a submodule counts as it)."""
    found = set()
    for target, name, _ in imports(module):
        if name is not None and f"{target}.{name}" in MODULES:
            found.add(f"{target}.{name}")
        elif target in MODULES:
            found.add(target)
    found.discard(module)
    return found


def test_no_import_circle() -> None:
    graph = {module: postroom_edges(module) for module in MODULES}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    # A package's __init__ re-exporting its own submodules is not a circle to fix.
    real = [c for c in circles if not all(m.startswith(c[0] + ".") for m in c[1:-1])]
    assert not real, "import circles: " + "; ".join(" → ".join(c) for c in real)


def _importers(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("postroom.brokers", ("postroom.config", "postroom.schema", "postroom.database",
                              "postroom.relay", "postroom.consumer", "postroom.cli",
                              "postroom.outbox", "sqlalchemy", "psycopg")),
        ("postroom.config", ("postroom.schema", "postroom.database", "postroom.brokers")),
        ("postroom.urls", ("postroom.config", "postroom.schema", "postroom.database")),
        ("postroom.schema", ("postroom.config", "postroom.relay", "postroom.consumer",
                             "postroom.cli", "postroom.brokers")),
        ("postroom.relay", ("postroom.consumer", "postroom.cli")),
        ("postroom.consumer", ("postroom.relay", "postroom.cli")),
    ],
)  # fmt: skip
def test_layers_import_only_downwards(layer: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(
        {
            f"{module}:{line} imports {target}"
            for module in _importers(layer)
            for target, _, line in imports(module)
            if any(target == f or target.startswith(f + ".") for f in forbidden)
        }
    )
    assert not wrong, "\n".join(wrong)


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_no_package_imports_another_packages_private_names() -> None:
    wrong = [
        f"{module}:{line} imports {target}.{name}"
        for module in MODULES
        for target, name, line in imports(module)
        if target.startswith("postroom")
        and name is not None
        and name.startswith("_")
        and not name.startswith("__")
        and _package_of(module) != (target if target in MODULES and _is_package(target)
                                    else target.rpartition(".")[0])
    ]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        module: lines
        for module, path in MODULES.items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_the_consumer_uses_deliveries_through_their_protocol_only() -> None:
    probes = [
        f"{module}:{node.lineno}"
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"getattr", "hasattr"}
        and node.args
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id == "delivery"
    ]
    assert not probes, f"getattr/hasattr on a delivery: {probes}"


def test_the_checks_see_the_imports_they_judge() -> None:
    # The rules above are only as good as the graph: it must hold known edges.
    assert "postroom.brokers.base" in postroom_edges("postroom.brokers.kafka.settings")
    assert "postroom.urls" in postroom_edges("postroom.database")
    assert "postroom.schema.tables" in postroom_edges("postroom.schema.relay_sql")
    lazy = {t for t, _, _ in imports("postroom.brokers.kafka")}
    assert "confluent_kafka" in lazy  # imported inside functions only
