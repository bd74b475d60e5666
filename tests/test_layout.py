"""The package's shape: packages by concept with few modules left at the top, no import circles
(imports inside functions count), argparse in the CLI alone, the pure core free of Ray, vLLM, torch,
DeepSpeed and HTTP clients, and no module too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nat_ray"
MAX_LINES = 800
MAX_TOP_MODULES = 12
# What a pure module may not import, anywhere in it (functions included).
HEAVY = (
    "ray",
    "vllm",
    "torch",
    "deepspeed",
    "transformers",
    "peft",
    "requests",
    "httpx",
    "aiohttp",
    "urllib3",
)
PACKAGES = ("core", "engines", "evaluation", "experiment", "rollout", "serve", "tasks", "tools", "train")


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
            # "nat_ray.tools.search.tool" imports nat_ray.tools.search.tool and, first, its package nat_ray.tools.
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


def _pure_modules() -> list[str]:
    """Every module of ``nat_ray.core``, and the results tables."""
    core = [name for name in MODULES if name == "nat_ray.core" or name.startswith("nat_ray.core.")]
    return [*core, "nat_ray.evaluation.results_table"]


def test_the_pure_core_imports_nothing_heavy():
    assert len(_pure_modules()) >= 8
    for name in _pure_modules():
        heavy = {i for i in _imports(name) if i.split(".")[0] in HEAVY or i.startswith("http.client")}
        assert heavy == set(), f"{name} imports {heavy}"


def test_modules_live_in_packages_by_concept():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_MODULES, top
    for package in PACKAGES:
        assert (PACKAGE / package / "__init__.py").is_file(), package
        assert ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())), package


def test_no_module_is_too_long_to_read():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_package_hides_a_submodule_behind_another_name():
    """``nat_ray.tools.search`` is the search package: a function bound under that name in
    ``nat_ray/tools/__init__.py`` breaks ``import nat_ray.tools.search.tool``."""
    for init in PACKAGE.rglob("__init__.py"):
        package = _module_name(init)
        children = {p.stem for p in init.parent.glob("*.py")} | {
            p.name for p in init.parent.iterdir() if p.is_dir()
        }
        children -= {"__init__", "__pycache__"}
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    bound = alias.asname or alias.name
                    is_child = node.module == package and alias.name == bound
                    assert bound not in children or is_child, f"{package} binds {bound!r} over its submodule"
