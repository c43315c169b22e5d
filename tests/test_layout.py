"""The code's shape, checked: imports point one way (no circles, function-level imports included, in
service/ or training/), and no service module grows past what a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LONGEST_SERVICE_MODULE = 420  # lines; generated code (service/protocol/descriptor.py) aside


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's own modules `name` imports anywhere in its source (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None
    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_hidden_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["service", "training"])
def test_imports_point_one_way(package):
    known = modules(package)
    # a package's __init__ importing its submodules is not a circle with them
    graph = {name: {m for m in imports(name, path, known) if not name.startswith(m + ".") or m == name}
             for name, path in known.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])


def test_no_service_module_is_past_what_a_reader_takes_in():
    long = {str(path.relative_to(ROOT)): n for path in (ROOT / "service").rglob("*.py")
            if path.name != "descriptor.py" and (n := len(path.read_text().splitlines())) > LONGEST_SERVICE_MODULE}
    assert not long, long
