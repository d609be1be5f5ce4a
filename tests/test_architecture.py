"""The floors of docs/ARCHITECTURE.md hold: no import loops, no part importing a part on a higher floor.

The table in docs/ARCHITECTURE.md is the one source: every module of ``loraloom`` must sit on a floor there, so a
new file is placed on purpose. Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "loraloom"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def floors_from_doc() -> dict[str, int]:
    """``part -> floor`` from the table rows ``| N | `part`, `part` | ... |`` of docs/ARCHITECTURE.md."""
    floors: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for part in re.findall(r"`([\w./]+)`", row.group(2)):
                floors[part.removesuffix(".py").removesuffix("/").replace("/", ".")] = int(row.group(1))
    return floors


def module_names() -> dict[str, Path]:
    """``loraloom.x.y -> file`` for every module of the package (``__init__`` named by its package)."""
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


def imports_of(name: str, file: Path, known: set[str]) -> set[str]:
    """The loraloom modules ``file`` imports, anywhere in it (a lazy import is an arrow too)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("loraloom") and target != name:
                found.add(target)
    return found


def part_of(module: str, floors: dict[str, int]) -> str | None:
    """The longest table part that ``module`` is, or sits in."""
    rel = module.removeprefix("loraloom").removeprefix(".") or "__init__"
    while rel:
        if rel in floors:
            return rel
        rel = rel.rpartition(".")[0]
    return None


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    part = part_of(module, floors)
    return None if part is None else floors[part]


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, file, set(names)) for name, file in names.items()}


def test_every_module_has_a_floor():
    floors = floors_from_doc()
    unplaced = sorted(m for m in module_names() if floor_of(m, floors) is None)
    assert not unplaced, f"modules on no floor of docs/ARCHITECTURE.md: {unplaced}"


def test_no_arrow_points_up_or_sideways():
    """A part imports only parts on lower floors (and its own modules): siblings on a floor stay independent."""
    floors = floors_from_doc()
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            here, there = part_of(module, floors), part_of(target, floors)
            if here is None or there is None or here == there:
                continue
            if floors[there] > floors[here]:
                wrong.append(f"{module} (floor {floors[here]}) imports {target} (floor {floors[there]}): up a floor")
            elif floors[there] == floors[here]:
                wrong.append(f"{module} imports {target}: a sibling on floor {floors[here]}")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_no_import_loops():
    graph = import_graph()
    # A package's __init__ re-exports its submodules; a submodule reaching back into its own package's __init__
    # is the loop that matters, so keep every edge.
    loops, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_the_checker_sees_a_loop_and_an_upward_arrow(tmp_path, monkeypatch):
    """The walk itself works: a planted loop and a planted upward import are both reported."""
    graph = {"loraloom.a": {"loraloom.b"}, "loraloom.b": {"loraloom.a"}}
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: graph)
    with pytest.raises(AssertionError, match="import loops"):
        test_no_import_loops()
    monkeypatch.setattr(__import__(__name__), "floors_from_doc", lambda: {"a": 0, "b": 1})
    with pytest.raises(AssertionError, match="up a floor"):
        test_no_arrow_points_up_or_sideways()
    monkeypatch.setattr(__import__(__name__), "floors_from_doc", lambda: {"a": 1, "b": 1})
    with pytest.raises(AssertionError, match="a sibling on floor 1"):
        test_no_arrow_points_up_or_sideways()
