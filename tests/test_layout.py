"""The package's shape: no import circles (imports inside functions count), argparse in the CLI
alone, the pure core free of Ray and vLLM, and no module too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nat_ray"
MAX_LINES = 800
# Modules that must import neither Ray nor vLLM, anywhere in them (the core and its helpers).
PURE = (
    "react",
    "prompts",
    "scoring",
    "nat_data",
    "masks",
    "packing",
    "records",
    "results_table",
    "agent",
    "agent_card",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module name this module imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for imported in _imports(name):
            # "nat_ray.tools.search" imports nat_ray.tools.search and, first, its package nat_ray.tools.
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_between_modules():
    assert _cycles(_internal_graph()) == []


def test_only_the_cli_parses_command_lines_and_nothing_imports_the_cli():
    users = {name for name in MODULES if "argparse" in _imports(name)}
    assert users == {"nat_ray.cli"}
    assert [name for name, targets in _internal_graph().items() if "nat_ray.cli" in targets] == []


def test_the_pure_core_imports_no_ray_or_vllm():
    for short in PURE:
        heavy = {i for i in _imports(f"nat_ray.{short}") if i.split(".")[0] in ("ray", "vllm", "deepspeed")}
        assert heavy == set(), f"nat_ray.{short} imports {heavy}"


def test_no_module_is_too_long_to_read():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
