"""Structural rules of the production code (issue "one message, one path").

- no import cycles between production modules, counting imports inside functions too (a cycle
  hidden in a function is still two modules that cannot be understood apart);
- no production module imports test scaffolding (`tests`, `testing`, `bench`);
- functions fit on a screen (60 lines), or say why not on their `def` line with `# long: reason`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Folder → import name, as pyproject.toml's package-dir maps them.
PACKAGES = {"dssgd": "dssgd", "shared": "dssgd.shared", "worker": "dssgd.worker",
            "aggregator": "dssgd.aggregator"}
MAX_LINES = 60


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            stem = path.stem
            out[name if stem == "__init__" else f"{name}.{stem}"] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    found: set[str] = set()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:  # negative control
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_test_scaffolding_in_production() -> None:
    bad = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{name} imports {m}" for m in mods
                    if m.split(".")[0] in {"tests", "testing", "bench", "pytest"}
                    or m.startswith("dssgd.testing")]
    assert bad == []


def long_functions(source: str, where: str) -> list[str]:
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            size = (node.end_lineno or node.lineno) - start + 1
            header = lines[node.lineno - 1]
            if size > MAX_LINES and "# long:" not in header:
                out.append(f"{where}:{node.lineno} {node.name} ({size} lines)")
    return out


def test_functions_fit_on_a_screen() -> None:
    found = []
    for name, path in _modules().items():
        found += long_functions(path.read_text(), name)
    assert found == []


def test_long_function_check_can_fail() -> None:  # negative control
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    assert long_functions(f"def f():\n{body}\n", "m") == ["m:1 f (62 lines)"]
    assert long_functions(f"def f():  # long: a table\n{body}\n", "m") == []
