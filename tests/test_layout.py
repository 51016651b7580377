"""The house rules of the package layout, read from the source: no import cycle, nothing imports the
CLI, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import moerge

ROOT = Path(moerge.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moerge module ``name`` imports, at the top or inside a function (not for type checking)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_walk_sees_lazy_imports_and_finds_a_cycle() -> None:
    graph = _graph()
    assert "moerge.io.lora_view" in graph["moerge.io.checkpoint"]  # imported inside open_source
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    assert _cycle(_graph()) is None


def test_nothing_imports_the_cli() -> None:
    offenders = sorted(f"{m} imports {d}" for m, deps in _graph().items()
                       if not m.startswith(("moerge.cli", "moerge.__main__"))
                       for d in deps if d == "moerge.cli" or d.startswith("moerge.cli."))
    assert offenders == []


# What each part of the package may import (besides itself): the dependency rule of the README's design
# section. Data flows one way: readers -> planners -> the engine -> the writer; statistics, the evaluation and
# model forwards (runtime) sit beside it; the facade and the CLI on top.
ALLOWED = {
    "errors": set(), "version": set(), "native": set(), "measure": set(),
    "io": {"errors"},
    "arch": {"errors"},
    "recipe": {"errors", "io"},
    "methods": {"errors", "native"},
    "data": {"errors", "io"},
    "runtime": {"errors", "io"},
    "stats": {"errors", "io", "data", "runtime"},
    "engine": {"errors", "io", "arch", "recipe", "methods", "native", "stats"},  # stats: its format only
    "extract": {"errors", "io", "arch", "methods"},
    "testing": {"errors", "io", "methods"},
    "routing": {"errors", "version", "io", "data", "runtime", "extract"},
    "moe": {"errors", "io", "arch", "recipe", "methods", "engine", "data", "runtime"},
    "api": {"errors", "version", "io", "data", "recipe", "methods", "engine", "extract", "routing", "moe"},
    "moerge": {"api", "recipe", "version"},  # the lazy facade, moerge/__init__.py
    "demo": {"errors", "moerge", "testing"},
    "evaluation": {"errors", "io", "data", "runtime", "stats", "measure", "routing"},
    "__main__": {"cli"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moerge"


def test_each_part_imports_only_what_the_dependency_rule_allows() -> None:
    broken = []
    for module, deps in _graph().items():
        part = _part(module)
        if part == "cli":
            continue  # the CLI may use anything; nothing uses it
        for d in deps:
            if _part(d) != part and _part(d) not in ALLOWED[part]:
                broken.append(f"{module} imports {d}")
            if part == "engine" and _part(d) == "stats" and d != "moerge.stats.format":
                broken.append(f"{module} imports {d} (the engine reads the statistics contract only)")
    assert broken == []
    assert set(ALLOWED) | {"cli"} == {_part(m) for m in _graph()}  # a new part must be placed in the rule


def test_no_function_over_80_lines() -> None:
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
