"""Stairs that go one way, and rooms that fit: Ferry's import graph, checked from the source.

Every ``.py`` file under ``common/``, ``client/``, ``server/``, ``simulations/`` and ``ferry/``
is parsed with ``ast`` (nothing is imported), mapped to its ``ferry.*`` name through the
``package-dir`` mapping in pyproject.toml, and every import it makes is collected, at module
level and inside functions alike (an import hidden in a function is still an arrow). In
``from ferry.x import y``, ``y`` counts as the module ``ferry.x.y`` when it is one.

The layers, bottom to top::

    ferry.common  <-  ferry.client, ferry.server (never each other)  <-  ferry.simulations
                  <-  ferry (the front door: ferry.cli and its command modules)

Checked:

1. no import runs upward, and none runs sideways between ``ferry.client`` and ``ferry.server``;
2. the module graph has no cycle (the failure message prints one per tangle);
3. deployment plumbing (``ferry.common.deploy``: TLS checks, child processes, certificate
   names, used only by the launchers) is a room of its own that common's model layer never
   imports;
4. no module is above 400 lines unless its top (the lines before its first statement after
   the docstring, i.e. before ``from __future__`` or the first import) holds a comment line
   ``# size: <reason>`` saying why it keeps its length (the convention this test defines).

The tree checked is the repository this file sits in, or ``FERRY_LAYERING_ROOT`` when set (so
the same test can be pointed at an older checkout, e.g. a ``git worktree``).
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("FERRY_LAYERING_ROOT") or Path(__file__).resolve().parents[1])
MAX_LINES = 400
SIZE_REASON = re.compile(r"^#\s*size:\s*\S")

# Rank of each layer: an import may only go to a strictly lower rank, or stay in its own package.
LAYER_RANK = {
    "ferry.common": 0,
    "ferry.client": 1,
    "ferry.server": 1,
    "ferry.simulations": 2,
    "ferry": 3,
}


def _package_dirs(root: Path) -> dict[str, Path]:
    """``ferry.*`` package name -> folder, from pyproject's ``[tool.setuptools.package-dir]``."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {name: root / folder for name, folder in mapping.items()}


def _modules(root: Path) -> dict[str, Path]:
    """Every module's dotted name -> its file (``__init__.py`` names the package itself)."""
    modules: dict[str, Path] = {}
    for package, folder in _package_dirs(root).items():
        if package != "ferry" and package.count(".") != 1:
            continue
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            # ferry/ maps ferry.*; a deeper mapping (ferry.common) owns its own folder.
            modules.setdefault(name, path)
    return modules


DEPLOY = "ferry.common.deploy"


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> str:
    for layer in sorted(LAYER_RANK, key=len, reverse=True):
        if _inside(module, layer):
            return layer
    raise AssertionError(f"{module} is in no layer")


def _imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The ``ferry.*`` modules ``path`` imports anywhere in its body."""
    return _imports_of_source(path.read_text(), module, modules, path.name == "__init__.py")


def _imports_of_source(
    source: str, module: str, modules: dict[str, Path], is_package: bool = False
) -> set[str]:
    """The ``ferry.*`` modules (keys of ``modules``) that ``source``, the text of ``module``,
    imports anywhere: relative imports resolved, ``from a import b`` as ``a.b`` if a module."""
    tree = ast.parse(source)
    found: set[str] = set()

    def nearest_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" for alias in node.names] + [origin]
        for target in targets:
            if target == "ferry" or target.startswith("ferry."):
                resolved = nearest_module(target)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


def _graph(root: Path) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _is_ancestor_package(importer: str, imported: str) -> bool:
    """``ferry.server.x`` importing ``ferry.server`` runs ``server/__init__.py``: no arrow up."""
    return importer.startswith(imported + ".")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for importer, imported_set in sorted(graph.items()):
        for imported in sorted(imported_set):
            if _is_ancestor_package(importer, imported):
                continue
            low, high = _layer(importer), _layer(imported)
            if low == high:
                continue
            if LAYER_RANK[high] >= LAYER_RANK[low]:
                wrong.append(f"{importer} -> {imported}")
    return wrong


def find_cycle(graph: dict[str, set[str]], within: set[str] | None = None) -> list[str] | None:
    """One cycle in ``graph`` (among the modules ``within``, default all) as ``[a, b, ..., a]``,
    or None (iterative depth-first search)."""
    nodes = set(graph) if within is None else within
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(nodes):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            if nxt not in nodes:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt in graph and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per group of modules that import each other (strongly connected), so that a
    failure shows every tangle at once."""
    reverse: dict[str, set[str]] = {name: set() for name in graph}
    for importer, imported in graph.items():
        for name in imported:
            if name in reverse:
                reverse[name].add(importer)
    cycles, placed = [], set()
    for name in sorted(graph):
        if name in placed:
            continue
        group = _reachable(graph, name) & _reachable(reverse, name)
        placed |= group
        if len(group) > 1:
            cycles.append(find_cycle(graph, group))
    return cycles


def _top_lines(source: str) -> list[str]:
    """The lines before the first statement that is not the module docstring."""
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    lines = source.splitlines()
    return lines[: body[0].lineno - 1] if body else lines


def oversized_modules(root: Path) -> list[str]:
    over = []
    for name, path in sorted(_modules(root).items()):
        source = path.read_text()
        lines = source.count("\n") + (not source.endswith("\n") and bool(source))
        if lines <= MAX_LINES:
            continue
        if any(SIZE_REASON.match(line.strip()) for line in _top_lines(source)):
            continue
        over.append(f"{name} ({path.relative_to(root)}): {lines} lines")
    return over


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _graph(ROOT)


def test_the_parser_sees_every_layer_and_resolves_imported_modules(graph):
    # Guards the test itself: an empty graph or an unresolved `from ferry.x import module`
    # would make the checks below pass vacuously.
    assert {_layer(name) for name in graph} == set(LAYER_RANK)
    assert "ferry.common.errors" in graph
    assert any("ferry.common.errors" in imported for imported in graph.values())
    assert "ferry.cli" in graph


def test_no_import_runs_upward_or_between_client_and_server(graph):
    wrong = upward_imports(graph)
    assert not wrong, "imports against the stairs (importer -> imported):\n" + "\n".join(wrong)


def test_the_module_graph_has_no_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_deployment_plumbing_is_apart_from_the_model_layer(graph):
    # TLS checks, child processes and certificate names serve only the launchers of real
    # processes: they live in their own room, which common's model layer never enters.
    assert DEPLOY in graph, f"{DEPLOY} (the launchers' shared plumbing) is missing"
    entering = sorted(
        importer
        for importer, imported in graph.items()
        if _layer(importer) == "ferry.common"
        and not _inside(importer, DEPLOY)
        and any(_inside(name, DEPLOY) for name in imported)
    )
    assert not entering, f"common modules that import {DEPLOY}: {entering}"


def test_no_module_above_400_lines_without_a_size_reason():
    over = oversized_modules(ROOT)
    assert not over, (
        f"modules above {MAX_LINES} lines without a `# size: <reason>` line at the top:\n"
        + "\n".join(over)
    )


def test_the_checks_catch_what_they_are_meant_to_catch():
    # A small synthetic graph: each check fires on a planted fault.
    planted = {
        "ferry.common.a": {"ferry.server.b"},
        "ferry.server.b": {"ferry.client.c"},
        "ferry.client.c": {"ferry.common.a"},
        "ferry.common.d": {"ferry.common.e"},
        "ferry.common.e": {"ferry.common.d", "ferry.common.a"},
    }
    assert upward_imports(planted) == [
        "ferry.common.a -> ferry.server.b",
        "ferry.server.b -> ferry.client.c",
    ]
    cycles = find_cycles(planted)
    assert [set(c) for c in cycles] == [
        {"ferry.client.c", "ferry.common.a", "ferry.server.b"},
        {"ferry.common.d", "ferry.common.e"},
    ]
    assert all(c[0] == c[-1] and len(c) == len(set(c)) + 1 for c in cycles)
    assert find_cycles({"ferry.common.a": {"ferry.common.b"}, "ferry.common.b": set()}) == []
    # The size reason counts only at the top, as a comment.
    reason = '"""Doc."""\n\n# size: one table per row of the spec\nimport os\n'
    assert any(SIZE_REASON.match(line) for line in _top_lines(reason))
    late = '"""Doc."""\n\nimport os\n# size: too late\n'
    assert not any(SIZE_REASON.match(line) for line in _top_lines(late))
    # An import made inside a function counts; a submodule named by `from package import x`
    # resolves to that module.
    module = ROOT / "common" / "errors.py"
    modules = {"ferry.common.errors": module, "ferry.common.data.tabular": module}
    tree_source = "def f():\n    from ferry.common.data import tabular\n"
    found = _imports_of_source(tree_source, "ferry.common.errors", modules)
    assert found == {"ferry.common.data.tabular"}
