"""Imports among polyfid's modules run one way: down the layers, and never round a loop.

The graph is read from the source with `ast` (nothing is imported). Imports inside functions and under
`if TYPE_CHECKING:` count: they hide a dependency from Python, not from the reader.

The rooms, bottom to top (ROOMS). A module may import its own room and the rooms below it, never one above
or beside it. The rooms of `distributed/` are layers too: config < modes < finetune < loop < driver.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `polyfid`
LAYERS = ("data_shards", "models", "infra", "evaluation", "distributed", "launch", "datasets")
ROOMS: tuple[tuple[str, ...], ...] = (  # bottom to top; the rooms of one tuple sit side by side
    ("polyfid._util", "polyfid._version"),
    ("polyfid.data_shards",),
    ("polyfid.models",),
    ("polyfid.infra",),
    ("polyfid.evaluation",),
    ("polyfid.distributed.config", "polyfid.distributed"),
    ("polyfid.distributed.modes",),
    ("polyfid.distributed.finetune",),
    ("polyfid.distributed.loop",),
    ("polyfid.distributed.driver",),
    ("polyfid.launch", "polyfid.datasets", "polyfid"),
)
# Cycles allowed, each as the set of its modules: none.
KNOWN: set[frozenset[str]] = set()


def room_of(module: str) -> tuple[int, str]:
    """(floor, room) of a module: the longest room name that is the module or a package above it (the package
    root `polyfid`, its __init__, is a room of one module)."""
    best = None
    for floor, rooms in enumerate(ROOMS):
        for room in rooms:
            inside = module.startswith(room + ".") and room != "polyfid"
            if (module == room or inside) and (best is None or len(room) > len(best[1])):
                best = (floor, room)
    assert best is not None, f"{module} is in no room of ROOMS"
    return best


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a room above the importer's, or of another room on its floor."""
    bad = []
    for name, targets in sorted(graph.items()):
        floor, room = room_of(name)
        for target in sorted(targets):
            t_floor, t_room = room_of(target)
            if t_room != room and t_floor >= floor:
                bad.append(f"{name} ({room}) imports {target} ({t_room})")
    return bad


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


def _import_nodes(body: list[ast.stmt], deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (and, if `deferred`, those in functions)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` included
            found += _import_nodes(node.body, deferred) + _import_nodes(node.orelse, deferred)
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


def _imported(name: str, path: Path, modules: dict[str, Path], deferred: bool, source: str | None = None) -> set[str]:
    """The polyfid modules (of `modules`) that module `name` imports (its file's text, or `source`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    text = path.read_text() if source is None else source
    for node in _import_nodes(ast.parse(text, str(path)).body, deferred):
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


def test_every_import_goes_down_the_rooms():
    """The layer order of the code as it is: data_shards < models < infra < evaluation < distributed's rooms <
    launch. In particular evaluation/ never imports distributed/, and the loop never imports the driver."""
    graph = _graph(deferred=True)
    assert not upward(graph), "imports up or across the rooms:\n  " + "\n  ".join(upward(graph))


def test_every_module_is_in_a_room():
    for name in _modules():
        room_of(name)


def test_a_planted_upward_import_fails_the_layer_check():
    """The check reads what is written: an upward import planted in a real module's text, even under
    TYPE_CHECKING or inside a function, is reported."""
    modules = _modules()
    graph = _graph(deferred=True)
    name = "polyfid.evaluation.metrics"
    source = modules[name].read_text()
    for plant in ("\nif TYPE_CHECKING:\n    from polyfid.distributed.loop.trainer import Trainer\n",
                  "\ndef _late():\n    from polyfid.infra import tracking\n    import polyfid.launch.cli\n"):
        planted = dict(graph)
        planted[name] = _imported(name, modules[name], modules, True, source + plant)
        bad = upward(planted)
        assert bad and all(b.startswith(name) for b in bad), bad
    assert not [b for b in upward(graph) if b.startswith(name)]
