"""Imports among polyfid's modules run one way: no module imports, directly or round a loop, one that imports it.

The graph is read from the source with `ast` (nothing is imported). Imports under `if TYPE_CHECKING:` are
left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `polyfid`
LAYERS = ("data_shards", "models", "distributed", "launch", "evaluation")
# Cycles allowed, each as the set of its modules: none.
KNOWN: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    """{dotted module name: file} for the package's own top-level files and every file of the layers."""
    files = sorted(ROOT.glob("*.py"))
    for layer in LAYERS:
        files += sorted((ROOT / layer).rglob("*.py"))
    out = {}
    for path in files:
        parts = ("polyfid",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(body: list[ast.stmt], deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (and, if `deferred`, those in functions)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            found += _import_nodes(node.orelse, deferred)
            if not _is_type_checking(node):
                found += _import_nodes(node.body, deferred)
        elif isinstance(node, (ast.Try, ast.With)):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                found += _import_nodes(block, deferred)
            for handler in getattr(node, "handlers", []):
                found += _import_nodes(handler.body, deferred)
        elif isinstance(node, ast.ClassDef):
            found += _import_nodes(node.body, deferred)
        elif deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += _import_nodes(node.body, deferred)
    return found


def _imported(name: str, path: Path, modules: dict[str, Path], deferred: bool) -> set[str]:
    """The polyfid modules (of `modules`) that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)).body, deferred):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        submodules = {f"{base}.{a.name}" for a in node.names} & set(modules)
        targets |= submodules
        if len(submodules) < len(node.names):  # a name defined in `base` itself: its __init__ runs for it
            targets.add(base)
    return {t for t in targets if t in modules and t != name}


def _graph(deferred: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules, deferred) for name, path in modules.items()}


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _loop(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete loop through the component, as module names from a module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def _check(deferred: bool) -> None:
    graph = _graph(deferred)
    assert "polyfid.data_shards.store" in graph and "polyfid.models.potential" in graph  # the walk found them
    loops = [" -> ".join(_loop(c, graph)) for c in _components(graph) if frozenset(c) not in KNOWN]
    assert not loops, "import cycles:\n  " + "\n  ".join(loops)


def test_no_import_cycle_among_module_level_imports():
    _check(deferred=False)


def test_no_import_cycle_with_imports_inside_functions():
    """Deferring an import into a function hides a cycle from Python, not from the reader: count those too."""
    _check(deferred=True)


def test_data_and_models_do_not_import_the_package_root():
    """`data_shards` and `models` sit below `polyfid/__init__.py`; the version is in the leaf `polyfid._version`."""
    modules = _modules()
    graph = _graph(deferred=True)
    up = {name: sorted(targets & {"polyfid"}) for name, targets in graph.items()
          if name.startswith(("polyfid.data_shards", "polyfid.models"))}
    assert not {name for name, targets in up.items() if targets}, [n for n, t in up.items() if t]
    assert "polyfid._version" in modules


def test_the_cycle_finder_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _components(graph) == [{"a", "b", "c"}]
    assert _loop({"a", "b", "c"}, graph) == ["a", "b", "c", "a"]
