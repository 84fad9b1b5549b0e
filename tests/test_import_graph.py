"""The modules of `mnres/` import one another without a cycle.

Every `import` and `from ... import` statement of every file under `mnres/` counts: at module
level, inside functions and under `if TYPE_CHECKING:`. The rules that turn a statement into
edges of the graph (module -> module it imports):

- A package is its `__init__.py`: `mnres/data/__init__.py` is the node `mnres.data`.
- `import mnres.a.b` is an edge to `mnres.a.b`, the module whose names the importer uses.
- `from mnres.a import b` is an edge to `mnres.a.b` when `b` is a submodule (a file or a
  package under `mnres/a/`), else to `mnres.a` (b is a name defined there). So
  `from mnres import data` inside `mnres.models` is an edge to `mnres.data`, not to `mnres`:
  the importer needs `mnres.data` complete, not the top-level package's re-exports.
- Importing a submodule runs its parent packages' `__init__` first, but that is no edge:
  Python puts a package in `sys.modules` before running its `__init__`, and a submodule that
  needs one of the parent's names imports it by its own path (an edge counted by the rules
  above). Counting parents would make every `__init__` that re-exports its submodules a cycle.
- Relative imports are resolved against the importing module's package.
- `mnres/_moved.py` imports the 0.1 module paths by name (strings given to importlib): no
  statement, so no edge.
"""

from __future__ import annotations

import ast
import pathlib

import mnres

PACKAGE_DIR = pathlib.Path(mnres.__file__).parent


def _module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def import_graph(package_dir: pathlib.Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """{module: the mnres modules it imports anywhere in its file}, by the rules above."""
    files = {_module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x`, `from ..a import b`
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (a depth-first search)."""
    done, path, on_path = set(), [], set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for target in sorted(graph[node]):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "mnres.data" in graph and "mnres" in graph  # packages are their __init__
    # A module-level `from mnres import data`-style import and a function-level one.
    assert "mnres.data" in graph["mnres.training.loop"]
    assert "mnres.weights" in graph["mnres"]  # inside mnres.__getattr__


def test_find_cycle_reports_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_mnres_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in mnres/: " + " -> ".join(cycle)
